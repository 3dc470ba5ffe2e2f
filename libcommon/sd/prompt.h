/* Prompt emphasis in AUTOMATIC1111's syntax, so prompts written for A1111
 * (or for tools that copied it) mean the same here:
 *
 *   (words)        weight x 1.1          [words]      weight / 1.1
 *   (words:1.3)    weight x 1.3          nesting multiplies: ((a)) = x 1.21
 *   \( \) \[ \]    literal brackets      BREAK        start a new 75-token chunk
 *
 * An unclosed ( or [ applies to the rest of the prompt, as in A1111; a
 * weight outside parentheses is ordinary text.  Adjacent fragments of equal
 * weight are merged.  Long prompts are cut into chunks of 75 tokens, each
 * framed by BOS/EOS to 77 and encoded separately; the encodings are
 * concatenated along the token axis (db-sample documents this). */
#ifndef DB_PROMPT_H
#define DB_PROMPT_H

#include <stddef.h>

#include "../core/err.h"

typedef struct db_prompt_frag {
    char *text;     /* UTF-8, owned by the list */
    double weight;  /* < 0 marks a BREAK */
} db_prompt_frag;

typedef struct db_prompt {
    db_prompt_frag *v;
    size_t n;
} db_prompt;

int db_prompt_parse(db_prompt *p, const char *text, db_err *err);
void db_prompt_free(db_prompt *p);

#endif
