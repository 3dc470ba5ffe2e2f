#include "prompt.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

/* The parser keeps a list of fragments and two stacks of positions where
 * ( and [ opened; closing one multiplies the weights of every fragment
 * appended since, which is how A1111's parse_prompt_attention works. */
typedef struct builder {
    db_prompt *p;
    size_t cap;
    size_t round[256], square[256];
    int nround, nsquare;
} builder;

static int push(builder *b, const char *s, size_t n, double w, db_err *err)
{
    if (b->p->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 16;
        db_prompt_frag *v = realloc(b->p->v, cap * sizeof *v);
        if (!v)
            return db_err_set(err, DB_ENOMEM, "out of memory");
        b->p->v = v;
        b->cap = cap;
    }
    char *t = malloc(n + 1);
    if (!t)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    memcpy(t, s, n);
    t[n] = 0;
    b->p->v[b->p->n++] = (db_prompt_frag){t, w};
    return 0;
}

static void multiply_from(builder *b, size_t start, double m)
{
    for (size_t i = start; i < b->p->n; i++)
        if (b->p->v[i].weight >= 0)
            b->p->v[i].weight *= m;
}

/* ":" spaces number spaces ")" — A1111's `:\s*([+-]?[.\d]+)\s*\)`. */
static size_t match_weight(const char *s, double *w)
{
    const char *p = s;
    if (*p != ':')
        return 0;
    p++;
    while (isspace((unsigned char)*p))
        p++;
    const char *num = p;
    if (*p == '+' || *p == '-')
        p++;
    const char *digits = p;
    while (isdigit((unsigned char)*p) || *p == '.')
        p++;
    if (p == digits)
        return 0;
    char buf[64];
    size_t n = (size_t)(p - num);
    if (n >= sizeof buf)
        return 0;
    memcpy(buf, num, n);
    buf[n] = 0;
    char *end;
    *w = strtod(buf, &end);
    if (*end) /* "1.2.3" is not a number Python's float() takes either */
        return 0;
    while (isspace((unsigned char)*p))
        p++;
    if (*p != ')')
        return 0;
    return (size_t)(p + 1 - s);
}

/* Split plain text on BREAK (a whole word, with surrounding spaces eaten). */
static int push_text(builder *b, const char *s, size_t n, db_err *err)
{
    size_t start = 0;
    for (size_t i = 0; i + 5 <= n; i++) {
        if (memcmp(s + i, "BREAK", 5))
            continue;
        int left = i == 0 || !(isalnum((unsigned char)s[i - 1]) || s[i - 1] == '_');
        int right = i + 5 == n || !(isalnum((unsigned char)s[i + 5]) || s[i + 5] == '_');
        if (!left || !right)
            continue;
        size_t a = i, z = i + 5;
        while (a > start && isspace((unsigned char)s[a - 1]))
            a--;
        while (z < n && isspace((unsigned char)s[z]))
            z++;
        if (push(b, s + start, a - start, 1.0, err) || push(b, "BREAK", 5, -1.0, err))
            return -1;
        start = z;
        i = z - 1;
    }
    return push(b, s + start, n - start, 1.0, err);
}

int db_prompt_parse(db_prompt *p, const char *text, db_err *err)
{
    memset(p, 0, sizeof *p);
    builder b = {.p = p};
    const char *s = text;
    while (*s) {
        double w;
        size_t wl;
        if (*s == '\\' && s[1] && strchr("()[]\\", s[1])) {
            if (push(&b, s + 1, 1, 1.0, err))
                goto fail;
            s += 2;
        } else if (*s == '\\') {
            s++; /* A1111 drops a lone backslash (it keeps text[1:], which is empty) */
        } else if (*s == '(' || *s == '[') {
            int round = *s == '(';
            if ((round ? b.nround : b.nsquare) >= 256) {
                db_err_set(err, DB_EUSAGE, "prompt: brackets nested deeper than 256");
                goto fail;
            }
            if (round)
                b.round[b.nround++] = p->n;
            else
                b.square[b.nsquare++] = p->n;
            s++;
        } else if ((wl = match_weight(s, &w)) && b.nround) {
            multiply_from(&b, b.round[--b.nround], w);
            s += wl;
        } else if (*s == ')' && b.nround) {
            multiply_from(&b, b.round[--b.nround], 1.1);
            s++;
        } else if (*s == ']' && b.nsquare) {
            multiply_from(&b, b.square[--b.nsquare], 1 / 1.1);
            s++;
        } else if (wl) {
            /* a weight with no open parenthesis is text */
            if (push_text(&b, s, wl, err))
                goto fail;
            s += wl;
        } else if (strchr("()[]:", *s)) {
            if (push(&b, s, 1, 1.0, err))
                goto fail;
            s++;
        } else {
            size_t n = strcspn(s, "\\()[]:");
            if (push_text(&b, s, n, err))
                goto fail;
            s += n;
        }
    }
    for (int i = 0; i < b.nround; i++)
        multiply_from(&b, b.round[i], 1.1);
    for (int i = 0; i < b.nsquare; i++)
        multiply_from(&b, b.square[i], 1 / 1.1);
    if (!p->n && push(&b, "", 0, 1.0, err))
        goto fail;
    /* merge runs of equal weight (BREAKs never merge: they are < 0 and unique in meaning) */
    size_t o = 0;
    for (size_t i = 0; i < p->n; i++) {
        if (o && p->v[o - 1].weight == p->v[i].weight && p->v[i].weight >= 0) {
            size_t la = strlen(p->v[o - 1].text), lb = strlen(p->v[i].text);
            char *t = realloc(p->v[o - 1].text, la + lb + 1);
            if (!t) {
                db_err_set(err, DB_ENOMEM, "out of memory");
                for (size_t k = i; k < p->n; k++) /* [o, i) were moved below o */
                    free(p->v[k].text);
                p->n = o;
                goto fail;
            }
            memcpy(t + la, p->v[i].text, lb + 1);
            p->v[o - 1].text = t;
            free(p->v[i].text);
        } else {
            p->v[o++] = p->v[i];
        }
    }
    p->n = o;
    return 0;
fail:
    db_prompt_free(p);
    return -1;
}

void db_prompt_free(db_prompt *p)
{
    for (size_t i = 0; i < p->n; i++)
        free(p->v[i].text);
    free(p->v);
    memset(p, 0, sizeof *p);
}
