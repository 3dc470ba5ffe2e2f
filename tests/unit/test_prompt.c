/* A1111 emphasis syntax: the examples from AUTOMATIC1111's own
 * parse_prompt_attention docstring, plus BREAK and edge cases. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "libcommon/sd/prompt.h"
#include "tap.h"

typedef struct want {
    const char *text;
    double w;
} want;

static void expect(const char *prompt, const want *w, size_t n)
{
    db_prompt p;
    db_err e = {0};
    int ok = !db_prompt_parse(&p, prompt, &e) && p.n == n;
    for (size_t i = 0; ok && i < n; i++)
        ok = !strcmp(p.v[i].text, w[i].text) && fabs(p.v[i].weight - w[i].w) < 1e-9;
    tap_ok(ok, "parse '%s'", prompt);
    if (!ok) {
        for (size_t i = 0; i < p.n; i++)
            tap_diag("got ['%s', %.10g]", p.v[i].text, p.v[i].weight);
        if (e.msg[0])
            tap_diag("error: %s", e.msg);
    }
    db_prompt_free(&p);
}

#define EXPECT(prompt, ...)                                  \
    do {                                                     \
        static const want w_[] = {__VA_ARGS__};              \
        expect(prompt, w_, sizeof w_ / sizeof w_[0]);        \
    } while (0)

int main(void)
{
    EXPECT("normal text", {"normal text", 1.0});
    EXPECT("an (important) word", {"an ", 1.0}, {"important", 1.1}, {" word", 1.0});
    EXPECT("(unbalanced", {"unbalanced", 1.1});
    EXPECT("\\(literal\\]", {"(literal]", 1.0});
    EXPECT("(unnecessary)(parens)", {"unnecessaryparens", 1.1});
    EXPECT("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", {"a ", 1.0}, {"house", 1.573},
           {" ", 1.1}, {"on", 1.0}, {" a ", 1.1}, {"hill", 0.55}, {", sun, ", 1.1}, {"sky", 1.4641}, {".", 1.1});
    EXPECT("", {"", 1.0});
    EXPECT("a [b] c", {"a ", 1.0}, {"b", 1 / 1.1}, {" c", 1.0});
    EXPECT("x:1.5) y", {"x:1.5) y", 1.0});
    EXPECT("(a: 2 ) b", {"a", 2.0}, {" b", 1.0});
    EXPECT("one BREAK two", {"one", 1.0}, {"BREAK", -1.0}, {"two", 1.0});
    EXPECT("BREAKFAST", {"BREAKFAST", 1.0});
    EXPECT("a \\ b", {"a  b", 1.0});
    EXPECT("time: 10", {"time: 10", 1.0});
    char deep[600];
    memset(deep, '(', 300);
    deep[300] = 0;
    db_prompt p;
    db_err e = {0};
    tap_ok(db_prompt_parse(&p, deep, &e) && strstr(e.msg, "nested"), "absurd nesting refused: %s", e.msg);
    return tap_done();
}
