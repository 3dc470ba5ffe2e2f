/* The text clean-up that transformers' CLIPTokenizer applies before BPE:
 *
 *   whitespace_clean(ftfy.fix_text(text)).lower()
 *
 * with ftfy 6.1.1 and its default settings (what diffusers' training set-up
 * installs), re-implemented on code points:
 *
 *   per line (ftfy fixes each "\n"-terminated segment on its own), repeated
 *   until nothing changes:
 *     unescape_html        "&amp;" "&eacute;" "&#39;" -> characters, unless a
 *                          '<' was seen (then the text is taken to be HTML)
 *     fix_encoding         mojibake: "cafÃ©" -> "café" (the "is it bad?"
 *                          heuristic, the nine single-byte encodings ftfy
 *                          tries, byte-A0 restoration, lossy sequences,
 *                          CESU-8/Java NUL, embedded mojibake, C1 controls)
 *     fix_c1_controls, fix_latin_ligatures ("ﬁ" -> "fi"),
 *     fix_character_width ("ＡＢＣ" -> "ABC", U+3000 -> ' '),
 *     uncurl_quotes, fix_line_breaks, remove_terminal_escapes,
 *     remove_control_chars, NFC (utf8proc)
 *   then \s+ -> ' ', strip, and Python's str.lower() (full mapping: 'İ' ->
 *   "i̇"; final sigma).
 *
 * The tables (HTML entities, the single-byte encodings, the mojibake
 * character classes, ligatures, width forms) are generated from ftfy itself
 * into textfix_tables.c by tests/data/tokenizer/make_textfix_tables.py.
 * ftfy is MIT-licensed (Robyn Speer); this is a re-implementation.
 *
 * Known differences from Python, all outside what a prompt can reach:
 * fix_surrogates has nothing to do (valid UTF-8 holds no surrogates); the
 * fixing loops stop after a bound (length + 64 rounds) where Python would
 * go on; Unicode tables are utf8proc's version. */
#ifndef DB_TEXTFIX_H
#define DB_TEXTFIX_H

#include <stddef.h>
#include <stdint.h>

#include "../core/err.h"

/* A growable string of Unicode code points. */
typedef struct db_text {
    uint32_t *c;
    size_t n, cap;
} db_text;

int db_text_reserve(db_text *t, size_t n); /* capacity >= n; -1 when out of memory */
int db_text_push(db_text *t, uint32_t c);
int db_text_append(db_text *t, const uint32_t *c, size_t n);
void db_text_free(db_text *t);

/* Strict UTF-8 as Python decodes it (no overlong forms, surrogates or code
 * points past U+10FFFF).  Appends to out; -1 with *bad = offset of the first
 * invalid byte (or *bad = len and errno ENOMEM when out of memory). */
int db_utf8_decode(db_text *out, const char *s, size_t len, size_t *bad);
/* Write c as UTF-8 (1..4 bytes) and return the length. */
size_t db_utf8_put(char *dst, uint32_t c);

/* ftfy.fix_text(t) with ftfy 6.1.1's defaults, in place. */
int db_ftfy_fix_text(db_text *t, db_err *err);
/* ftfy.badness.is_bad: does the text look like it contains mojibake? */
int db_ftfy_is_bad(const uint32_t *c, size_t n);
/* whitespace_clean(t).lower() of CLIPTokenizer, in place. */
int db_clip_clean_lower(db_text *t, db_err *err);

/* Character classes as CLIP's pre-tokenizer regex sees them (the `regex`
 * module with IGNORECASE): \s is Unicode White_Space; \p{L} and \p{N} are
 * the general categories L* and N*. */
int db_uni_is_white_space(uint32_t c);
int db_uni_is_letter(uint32_t c);
int db_uni_is_number(uint32_t c);

/* --- generated tables (textfix_tables.c) --------------------------------- */

typedef struct db_html_entity {
    const char *name;  /* between '&' and ';' */
    const char *value; /* UTF-8 */
} db_html_entity;
extern const db_html_entity db_html_entities[];
extern const size_t db_n_html_entities;

#define DB_NCHARMAPS 9
extern const char *const db_charmap_names[DB_NCHARMAPS];
/* [encoding][byte - 0x80] for bytes 0x80..0xff; [encoding][128] for byte 0x1a */
extern const uint16_t db_charmaps[DB_NCHARMAPS][129];

/* The mojibake character classes, in the generator's order. */
enum db_moji_bit {
    DB_MOJI_COMMON = 1u << 0,
    DB_MOJI_C1 = 1u << 1,
    DB_MOJI_BAD = 1u << 2,
    DB_MOJI_CURRENCY = 1u << 3,
    DB_MOJI_START = 1u << 4, /* start_punctuation */
    DB_MOJI_END = 1u << 5,   /* end_punctuation */
    DB_MOJI_NUMERIC = 1u << 6,
    DB_MOJI_KAOMOJI = 1u << 7,
    DB_MOJI_UPPER_ACC = 1u << 8,
    DB_MOJI_LOWER_ACC = 1u << 9,
    DB_MOJI_UPPER_COMMON = 1u << 10,
    DB_MOJI_LOWER_COMMON = 1u << 11,
    DB_MOJI_BOX = 1u << 12,
    DB_MOJI_U8_FIRST2 = 1u << 13, /* UTF8_CLUES: utf8_first_of_2 */
    DB_MOJI_U8_FIRST3 = 1u << 14,
    DB_MOJI_U8_FIRST4 = 1u << 15,
    DB_MOJI_U8_CONT = 1u << 16,
    DB_MOJI_U8_CONT_STRICT = 1u << 17,
};
typedef struct db_moji_class {
    uint32_t cp, mask;
} db_moji_class;
extern const db_moji_class db_moji_classes[];
extern const size_t db_n_moji_classes;

typedef struct db_cp_map {
    uint32_t cp;
    const char *to; /* UTF-8 */
} db_cp_map;
extern const db_cp_map db_ftfy_ligatures[];
extern const size_t db_ftfy_ligatures_n;
extern const db_cp_map db_ftfy_width[];
extern const size_t db_ftfy_width_n;

#endif
