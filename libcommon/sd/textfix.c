/* ftfy 6.1.1's fix_text and CLIPTokenizer's whitespace_clean + lower, on
 * code points.  See textfix.h for the steps; the Python names are kept so
 * each function can be read next to ftfy's source (ftfy/__init__.py,
 * fixes.py, chardata.py, badness.py, bad_codecs/). */
#include "textfix.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

/* ---- code point strings ------------------------------------------------- */

int db_text_reserve(db_text *t, size_t need)
{
    if (need <= t->cap)
        return 0;
    size_t cap = t->cap ? t->cap : 32;
    while (cap < need) {
        if (cap > SIZE_MAX / 2 / sizeof *t->c)
            return -1;
        cap *= 2;
    }
    uint32_t *c = realloc(t->c, cap * sizeof *c);
    if (!c)
        return -1;
    t->c = c;
    t->cap = cap;
    return 0;
}

int db_text_push(db_text *t, uint32_t c)
{
    if (t->n == t->cap && db_text_reserve(t, t->n + 1))
        return -1;
    t->c[t->n++] = c;
    return 0;
}

int db_text_append(db_text *t, const uint32_t *c, size_t n)
{
    if (db_text_reserve(t, t->n + n))
        return -1;
    if (n)
        memcpy(t->c + t->n, c, n * sizeof *c);
    t->n += n;
    return 0;
}

void db_text_free(db_text *t)
{
    free(t->c);
    t->c = NULL;
    t->n = t->cap = 0;
}

static int text_eq(const db_text *a, const db_text *b)
{
    return a->n == b->n && (a->n == 0 || !memcmp(a->c, b->c, a->n * sizeof *a->c));
}

static void text_swap(db_text *a, db_text *b)
{
    db_text t = *a;
    *a = *b;
    *b = t;
}

/* Append trusted UTF-8 (from our own tables). */
static int append_utf8(db_text *t, const char *s)
{
    size_t bad;
    return db_utf8_decode(t, s, strlen(s), &bad);
}

/* ---- UTF-8 --------------------------------------------------------------- */

/* One sequence at s[0..len): its length and code point, or 0 when Python's
 * strict decoder would stop there (Unicode Table 3-7 well-formed forms). */
static size_t utf8_one(const unsigned char *s, size_t len, uint32_t *cp)
{
    unsigned b = s[0];
    if (b < 0x80) {
        *cp = b;
        return 1;
    }
    size_t k;
    unsigned lo = 0x80, hi = 0xBF;
    uint32_t c;
    if (b >= 0xC2 && b <= 0xDF) {
        k = 2;
        c = b & 0x1F;
    } else if (b >= 0xE0 && b <= 0xEF) {
        k = 3;
        c = b & 0x0F;
        lo = b == 0xE0 ? 0xA0 : 0x80; /* no overlong forms */
        hi = b == 0xED ? 0x9F : 0xBF; /* no surrogates */
    } else if (b >= 0xF0 && b <= 0xF4) {
        k = 4;
        c = b & 0x07;
        lo = b == 0xF0 ? 0x90 : 0x80;
        hi = b == 0xF4 ? 0x8F : 0xBF; /* nothing past U+10FFFF */
    } else {
        return 0;
    }
    if (len < k || s[1] < lo || s[1] > hi)
        return 0;
    c = (c << 6) | (s[1] & 0x3F);
    for (size_t i = 2; i < k; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        c = (c << 6) | (s[i] & 0x3F);
    }
    *cp = c;
    return k;
}

int db_utf8_decode(db_text *out, const char *s, size_t len, size_t *bad)
{
    const unsigned char *u = (const unsigned char *)s;
    if (db_text_reserve(out, out->n + len)) {
        *bad = len;
        errno = ENOMEM;
        return -1;
    }
    for (size_t i = 0; i < len;) {
        uint32_t c;
        size_t k = utf8_one(u + i, len - i, &c);
        if (!k) {
            *bad = i;
            errno = EILSEQ;
            return -1;
        }
        out->c[out->n++] = c;
        i += k;
    }
    return 0;
}

size_t db_utf8_put(char *dst, uint32_t c)
{
    unsigned char *d = (unsigned char *)dst;
    if (c < 0x80) {
        d[0] = (unsigned char)c;
        return 1;
    }
    if (c < 0x800) {
        d[0] = (unsigned char)(0xC0 | (c >> 6));
        d[1] = (unsigned char)(0x80 | (c & 0x3F));
        return 2;
    }
    if (c < 0x10000) {
        d[0] = (unsigned char)(0xE0 | (c >> 12));
        d[1] = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
        d[2] = (unsigned char)(0x80 | (c & 0x3F));
        return 3;
    }
    d[0] = (unsigned char)(0xF0 | (c >> 18));
    d[1] = (unsigned char)(0x80 | ((c >> 12) & 0x3F));
    d[2] = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
    d[3] = (unsigned char)(0x80 | (c & 0x3F));
    return 4;
}

/* ---- character classes ---------------------------------------------------- */

/* Python's str.isspace() (what `re`'s \s and str.strip() use): White_Space
 * plus U+001C..U+001F. */
static int py_isspace(uint32_t c)
{
    return (c >= 0x1C && c <= 0x1F) || db_uni_is_white_space(c);
}

int db_uni_is_white_space(uint32_t c)
{
    switch (c) {
    case 0x09: case 0x0A: case 0x0B: case 0x0C: case 0x0D: case 0x20: case 0x85: case 0xA0:
    case 0x1680: case 0x2028: case 0x2029: case 0x202F: case 0x205F: case 0x3000:
        return 1;
    default:
        return c >= 0x2000 && c <= 0x200A;
    }
}

int db_uni_is_letter(uint32_t c)
{
    switch (utf8proc_category((utf8proc_int32_t)c)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO:
        return 1;
    default:
        return 0;
    }
}

int db_uni_is_number(uint32_t c)
{
    utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
    return k == UTF8PROC_CATEGORY_ND || k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_NO;
}

/* Python `re`'s \w on str: alphanumeric (str.isalnum) or '_'. */
static int py_isword(uint32_t c)
{
    return c == '_' || db_uni_is_letter(c) || db_uni_is_number(c);
}

static uint32_t moji_mask(uint32_t c)
{
    size_t lo = 0, hi = db_n_moji_classes;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (db_moji_classes[mid].cp < c)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < db_n_moji_classes && db_moji_classes[lo].cp == c ? db_moji_classes[lo].mask : 0;
}

/* Is c among the characters of a UTF-8 literal list? */
static int in_list(const char *list, uint32_t c)
{
    const unsigned char *u = (const unsigned char *)list;
    size_t len = strlen(list);
    for (size_t i = 0; i < len;) {
        uint32_t x = 0;
        size_t k = utf8_one(u + i, len - i, &x);
        if (x == c)
            return 1;
        i += k ? k : 1;
    }
    return 0;
}

/* ---- ftfy.badness.is_bad ------------------------------------------------- */

/* Classes outside the mojibake tables, above the db_moji_bit range. */
enum {
    X_AZ = 1u << 24,        /* [a-z] */
    X_AZU = 1u << 25,       /* [A-Z] */
    X_SPACE = 1u << 26,     /* \s (str.isspace) */
    X_WORD = 1u << 27,      /* \w */
    X_ANY = 1u << 28,       /* .  (anything but \n) */
    X_NOT_LATIN = 1u << 29, /* [^A-Za-z] */
};

typedef struct mcls {
    uint32_t bits;
    const char *lit; /* extra literal characters, UTF-8 */
} mcls;

typedef struct malt {
    int anchored; /* ^ */
    mcls c[7];    /* a zero class ends the pattern */
} malt;

#define M(x) DB_MOJI_##x
#define ACC_ETC (M(LOWER_ACC) | M(UPPER_ACC) | M(BOX) | M(START) | M(END) | M(CURRENCY) | M(NUMERIC))
#define L(s) {0, s}

/* BADNESS_RE, one alternative per row, in its order ("[a-z]\s?[ÃÂ][ ]" is
 * two rows; is_bad only asks whether any matches). */
static const malt badness_re[] = {
    {0, {{M(C1), 0}}},
    {0, {{M(BAD) | ACC_ETC, 0}, {M(BAD), 0}}},
    {0, {{X_AZ | X_AZU, 0}, {M(LOWER_COMMON) | M(UPPER_COMMON), 0}, {M(BAD), 0}}},
    {0, {{M(BAD), 0}, {ACC_ETC, 0}}},
    {0, {{M(LOWER_ACC) | M(LOWER_COMMON) | M(BOX) | M(END) | M(CURRENCY) | M(NUMERIC), 0}, {M(UPPER_ACC), 0}}},
    {0, {{M(BOX) | M(END) | M(CURRENCY) | M(NUMERIC), 0}, {M(LOWER_ACC), 0}}},
    {0, {{M(LOWER_ACC) | M(BOX) | M(END), 0}, {M(CURRENCY), 0}}},
    {0, {{X_SPACE, 0}, {M(UPPER_ACC), 0}, {M(CURRENCY), 0}}},
    {0, {{M(UPPER_ACC) | M(BOX), 0}, {M(NUMERIC), 0}}},
    {0, {{M(LOWER_ACC) | M(UPPER_ACC) | M(BOX) | M(CURRENCY) | M(END), 0}, {M(START), 0}, {M(NUMERIC), 0}}},
    {0, {{M(LOWER_ACC) | M(UPPER_ACC) | M(CURRENCY) | M(NUMERIC) | M(BOX), 0}, {M(END), 0}, {M(START), 0}}},
    {0, {{M(CURRENCY) | M(NUMERIC) | M(BOX), 0}, {M(START), 0}}},
    {0, {{X_AZ, 0}, {M(UPPER_ACC), 0}, {M(START) | M(CURRENCY), 0}}},
    {0, {{M(BOX), 0}, {M(KAOMOJI), 0}}},
    {0, {{M(LOWER_ACC) | M(UPPER_ACC) | M(CURRENCY) | M(NUMERIC) | M(START) | M(END), 0}, {M(BOX), 0}}},
    {0, {{M(BOX), 0}, {M(END), 0}}},
    {0, {{M(LOWER_ACC) | M(UPPER_ACC), 0}, {M(END), 0}, {X_WORD, 0}}},
    /* the ligature œ when not followed by an unaccented Latin letter */
    {0, {L("Œœ"), {X_NOT_LATIN, 0}}},
    /* common Windows-1252 2-character mojibake */
    {0, {L("ÂÃÎÐ"), {M(START) | M(END), "€Šš¢£Ÿž\u00a0\u00ad®©°·»–—´"}}},
    {0, {L("×"), L("²³")}},
    /* Windows-1252 mojibake of Arabic words */
    {0,
     {L("ØÙ"), {M(COMMON) | M(CURRENCY) | M(BAD) | M(NUMERIC) | M(START), "ŸŠ®°µ»"}, L("ØÙ"),
      {M(COMMON) | M(CURRENCY) | M(BAD) | M(NUMERIC) | M(START), "ŸŠ®°µ»"}}},
    /* South Asian alphabets */
    {0, {L("à"), L("²µ¹¼½¾")}},
    /* MacRoman */
    {0, {L("√"), L("±∂†≠®™´≤≥¥µø")}},
    {0, {L("≈"), L("°¢")}},
    {0, {L("‚"), L("Ä"), L("ìîïòôúùû†°¢π")}},
    {0, {L("‚"), L("âó"), L("àä°ê")}},
    /* Windows-1251 */
    {0, {L("в"), L("Ђ")}},
    {0, {L("ВГРС"), {M(C1) | M(BAD) | M(START) | M(END) | M(CURRENCY), "°µ"}, L("ВГРС")}},
    {0, {L("Г"), L("ў"), L("В"), L("Ђ"), L("В"), {X_ANY, 0}, {X_AZ | X_AZU, " "}}},
    /* Windows-1252 encodings of 'à' and 'á', and of \xa0 itself */
    {0, {L("Ã"), L("\u00a0¡")}},
    {0, {{X_AZ, 0}, {X_SPACE, 0}, L("ÃÂ"), L(" ")}},
    {0, {{X_AZ, 0}, L("ÃÂ"), L(" ")}},
    {1, {L("ÃÂ"), L(" ")}},
    /* Â preceding a character as an encoding of exactly that character */
    {0, {{X_AZ | M(END), ".,?!"}, L("Â"), {M(START) | M(END), " "}}},
    /* Windows-1253 */
    {0, {L("β"), L("€"), L("™\u00a0Ά\u00ad®°")}},
    {0, {L("ΒΓΞΟ"), {M(C1) | M(BAD) | M(START) | M(END) | M(CURRENCY), "°"}, L("ΒΓΞΟ")}},
};

static int cls_match(const mcls *k, uint32_t c, uint32_t mask)
{
    uint32_t b = k->bits;
    if (b & mask & 0xFFFFFFu)
        return 1;
    if (((b & X_AZ) && c >= 'a' && c <= 'z') || ((b & X_AZU) && c >= 'A' && c <= 'Z'))
        return 1;
    if ((b & X_SPACE) && py_isspace(c))
        return 1;
    if ((b & X_WORD) && py_isword(c))
        return 1;
    if ((b & X_ANY) && c != '\n')
        return 1;
    if ((b & X_NOT_LATIN) && !((c | 0x20) >= 'a' && (c | 0x20) <= 'z'))
        return 1;
    return k->lit && in_list(k->lit, c);
}

int db_ftfy_is_bad(const uint32_t *c, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        /* every pattern has a non-ASCII character among its first three
         * (an ASCII start is at most "[a-z]\s" before one): skip plain ASCII */
        if (c[i] < 0x80 && (i + 1 >= n || c[i + 1] < 0x80) && (i + 2 >= n || c[i + 2] < 0x80))
            continue;
        for (size_t a = 0; a < sizeof badness_re / sizeof badness_re[0]; a++) {
            const malt *p = &badness_re[a];
            if (p->anchored && i)
                continue;
            size_t k = 0;
            for (; k < 7 && (p->c[k].bits || p->c[k].lit); k++)
                if (i + k >= n || !cls_match(&p->c[k], c[i + k], moji_mask(c[i + k])))
                    break;
            if (k == 7 || !(p->c[k].bits || p->c[k].lit))
                return 1;
        }
    }
    return 0;
}

/* ---- fixes.unescape_html ------------------------------------------------- */

static int alnum_ascii(uint32_t c)
{
    return (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z');
}

static int entity_cmp(const void *key, const void *elt)
{
    return strcmp((const char *)key, ((const db_html_entity *)elt)->name);
}

/* What Python's html.unescape makes of "&#<body>;" (body after '#'), or -1
 * when ftfy keeps the reference as written: html.unescape decoded only part
 * of it, or the result contains ';'.  -2: decodes to nothing. */
static long numeric_ref(const char *body)
{
    int hex = body[0] == 'x' || body[0] == 'X';
    const char *d = body + hex;
    if (!*d)
        return -1;
    uint32_t num = 0;
    for (; *d; d++) {
        int v;
        if (*d >= '0' && *d <= '9')
            v = *d - '0';
        else if (hex && (*d | 0x20) >= 'a' && (*d | 0x20) <= 'f')
            v = (*d | 0x20) - 'a' + 10;
        else
            return -1;
        num = num * (hex ? 16u : 10u) + (uint32_t)v;
        if (num > 0x110000)
            num = 0x110000; /* saturate: anything past U+10FFFF is U+FFFD */
    }
    /* html._invalid_charrefs: NUL, CR and the Windows-1252 C1 range */
    if (num == 0)
        return 0xFFFD;
    if (num == 0x0D)
        return 0x0D;
    if (num >= 0x80 && num <= 0x9F)
        return db_charmaps[1][num - 0x80]; /* sloppy-windows-1252 is that table */
    if ((num >= 0xD800 && num <= 0xDFFF) || num > 0x10FFFF)
        return 0xFFFD;
    /* html._invalid_codepoints */
    if ((num >= 0x01 && num <= 0x08) || num == 0x0B || (num >= 0x0E && num <= 0x1F) || num == 0x7F ||
        (num >= 0xFDD0 && num <= 0xFDEF) || (num & 0xFFFE) == 0xFFFE)
        return -2;
    if (num == ';')
        return -1;
    return num;
}

/* HTML_ENTITY_RE = &#?[0-9A-Za-z]{1,24}; replaced through _unescape_fixup. */
static int unescape_html(const db_text *in, db_text *out)
{
    out->n = 0;
    for (size_t i = 0; i < in->n;) {
        const uint32_t *c = in->c;
        if (c[i] == '&') {
            size_t j = i + 1;
            int num = j < in->n && c[j] == '#';
            j += num;
            size_t s = j;
            while (j < in->n && j - s < 25 && alnum_ascii(c[j]))
                j++;
            if (j > s && j - s <= 24 && j < in->n && c[j] == ';') {
                char name[32];
                for (size_t k = s; k < j; k++)
                    name[k - s] = (char)c[k];
                name[j - s] = 0;
                size_t end = j + 1;
                if (!num) {
                    const db_html_entity *e = bsearch(name, db_html_entities, db_n_html_entities,
                                                      sizeof *e, entity_cmp);
                    if (e) {
                        if (append_utf8(out, e->value))
                            return -1;
                        i = end;
                        continue;
                    }
                } else {
                    long v = numeric_ref(name);
                    if (v != -1) {
                        if (v >= 0 && db_text_push(out, (uint32_t)v))
                            return -1;
                        i = end;
                        continue;
                    }
                }
                /* not an entity: keep "&...;" as written */
                if (db_text_append(out, c + i, end - i))
                    return -1;
                i = end;
                continue;
            }
        }
        if (db_text_push(out, in->c[i++]))
            return -1;
    }
    return 0;
}

/* ---- fix_encoding: byte-level helpers ------------------------------------ */

typedef struct bytes {
    unsigned char *b;
    size_t n, cap;
} bytes;

static int bytes_put(bytes *x, unsigned char v)
{
    if (x->n == x->cap) {
        size_t cap = x->cap ? 2 * x->cap : 64;
        unsigned char *b = realloc(x->b, cap);
        if (!b)
            return -1;
        x->b = b;
        x->cap = cap;
    }
    x->b[x->n++] = v;
    return 0;
}

/* A byte class is a list of inclusive (lo, hi) byte pairs; a pattern a
 * NULL-terminated list of classes.  Enough for ftfy's byte regexes, which
 * are alternations of fixed-length class sequences. */
static int in_bcls(const char *k, unsigned char b)
{
    for (; k[0]; k += 2)
        if (b >= (unsigned char)k[0] && b <= (unsigned char)k[1])
            return 1;
    return 0;
}

/* Length of the first alternative of pats[] matching at x[i], or 0. */
static size_t bmatch(const char *const (*pats)[7], size_t npats, const unsigned char *x, size_t n, size_t i)
{
    for (size_t a = 0; a < npats; a++) {
        size_t k = 0;
        while (pats[a][k] && i + k < n && in_bcls(pats[a][k], x[i + k]))
            k++;
        if (!pats[a][k])
            return k;
    }
    return 0;
}

#define CONT "\x80\xbf"
#define NOT85A0 "\x80\x84\x86\x9f\xa1\xbf" /* [\x80-\x84\x86-\x9f\xa1-\xbf] */

/* chardata.ALTERED_UTF8_RE: UTF-8 that would be valid if a space were byte A0 */
static const char *const altered_utf8[][7] = {
    {"\xc2\xc3\xc5\xc5\xce\xce\xd0\xd0\xd9\xd9", "  ", NULL},
    {"\xe2\xe3", "  ", NOT85A0, NULL},
    {"\xe0\xe3", NOT85A0, "  ", NULL},
    {"\xf0\xf0", "  ", CONT, CONT, NULL},
    {"\xf0\xf0", CONT, "  ", CONT, NULL},
    {"\xf0\xf0", CONT, CONT, "  ", NULL},
};

/* chardata.LOSSY_UTF8_RE: UTF-8 with continuation bytes lost to 0x1a ('?') */
static const char *const lossy_utf8[][7] = {
    {"\xc2\xdf", "\x1a\x1a", NULL},
    {"\xc2\xc3", "??", NULL},
    {"\xed\xed", "\xa0\xaf", "\x1a\x1a??", "\xed\xed", "\xb0\xbf", "\x1a\x1a??\x80\xbf", NULL},
    {"\xed\xed", "\xa0\xaf", "\x1a\x1a??\x80\xbf", "\xed\xed", "\xb0\xbf", "\x1a\x1a??", NULL},
    {"\xe0\xef", "\x1a\x1a??", "\x1a\x1a\x80\xbf", NULL},
    {"\xe0\xef", "\x1a\x1a\x80\xbf", "\x1a\x1a??", NULL},
    {"\xf0\xf4", "\x1a\x1a??", "\x1a\x1a\x80\xbf", "\x1a\x1a\x80\xbf", NULL},
    {"\xf0\xf4", "\x1a\x1a\x80\xbf", "\x1a\x1a??", "\x1a\x1a\x80\xbf", NULL},
    {"\xf0\xf4", "\x1a\x1a\x80\xbf", "\x1a\x1a\x80\xbf", "\x1a\x1a??", NULL},
    {"\x1a\x1a", NULL},
};

#define NPATS(p) (sizeof(p) / sizeof(p)[0])

static int altered_search(const bytes *x)
{
    for (size_t i = 0; i < x->n; i++)
        if (bmatch(altered_utf8, NPATS(altered_utf8), x->b, x->n, i))
            return 1;
    return 0;
}

/* fixes.restore_byte_a0: first A_GRAVE_WORD_RE ("\xc3 " not starting one of
 * the Portuguese words) -> "\xc3\xa0 ", then every ALTERED_UTF8_RE match gets
 * its spaces turned back into A0. */
static int restore_byte_a0(bytes *x)
{
    bytes t = {0}, u = {0};
    static const char *const keep[] = {" ", "quele", "quela", "quilo", "s "};
    for (size_t i = 0; i < x->n;) {
        if (x->b[i] == 0xC3 && i + 1 < x->n && x->b[i + 1] == ' ') {
            int excluded = 0;
            for (size_t k = 0; k < 5 && !excluded; k++) {
                size_t l = strlen(keep[k]);
                excluded = i + 2 + l <= x->n && !memcmp(x->b + i + 2, keep[k], l);
            }
            if (!excluded) {
                if (bytes_put(&t, 0xC3) || bytes_put(&t, 0xA0) || bytes_put(&t, ' '))
                    goto oom;
                i += 2;
                continue;
            }
        }
        if (bytes_put(&t, x->b[i++]))
            goto oom;
    }
    for (size_t i = 0; i < t.n;) {
        size_t l = bmatch(altered_utf8, NPATS(altered_utf8), t.b, t.n, i);
        if (!l)
            l = 1;
        else
            for (size_t k = i; k < i + l; k++)
                t.b[k] = t.b[k] == ' ' ? 0xA0 : t.b[k];
        for (size_t k = i; k < i + l; k++)
            if (bytes_put(&u, t.b[k]))
                goto oom;
        i += l;
    }
    free(t.b);
    free(x->b);
    *x = u;
    return 0;
oom:
    free(t.b);
    free(u.b);
    return -1;
}

/* fixes.replace_lossy_sequences: each LOSSY_UTF8_RE match -> UTF-8 of U+FFFD */
static int replace_lossy_sequences(bytes *x)
{
    bytes u = {0};
    for (size_t i = 0; i < x->n;) {
        size_t l = bmatch(lossy_utf8, NPATS(lossy_utf8), x->b, x->n, i);
        if (l) {
            if (bytes_put(&u, 0xEF) || bytes_put(&u, 0xBF) || bytes_put(&u, 0xBD))
                goto oom;
            i += l;
        } else if (bytes_put(&u, x->b[i++])) {
            goto oom;
        }
    }
    free(x->b);
    *x = u;
    return 0;
oom:
    free(u.b);
    return -1;
}

/* bytes.decode("utf-8-variants") of ftfy.bad_codecs: strict UTF-8, plus
 * CESU-8 surrogate pairs (ED A0-AF 80-BF ED B0-BF 80-BF) and Java's C0 80
 * for NUL.  The Python codec finds these with a regex whose `$` also
 * matches before a final "\n", so "\xc0\n" and a CESU-8 pair whose last byte
 * is a final "\n" decode too (consuming the newline); we do the same.
 * Returns 0, 1 when the bytes do not decode, -1 when out of memory. */
static int decode_utf8_variants(const bytes *x, db_text *out)
{
    const unsigned char *b = x->b;
    size_t n = x->n;
    out->n = 0;
    for (size_t i = 0; i < n;) {
        uint32_t c;
        if (b[i] == 0xC0 && i + 1 < n && (b[i + 1] == 0x80 || (b[i + 1] == '\n' && i + 2 == n))) {
            if (db_text_push(out, 0))
                return -1;
            i += 2;
            continue;
        }
        if (b[i] == 0xED && i + 6 <= n && b[i + 1] >= 0xA0 && b[i + 1] <= 0xAF && (b[i + 2] & 0xC0) == 0x80 &&
            b[i + 3] == 0xED && b[i + 4] >= 0xB0 && b[i + 4] <= 0xBF &&
            ((b[i + 5] & 0xC0) == 0x80 || (b[i + 5] == '\n' && i + 6 == n))) {
            c = ((uint32_t)(b[i + 1] & 0x0F) << 16) + ((uint32_t)(b[i + 2] & 0x3F) << 10) +
                ((uint32_t)(b[i + 4] & 0x0F) << 6) + (b[i + 5] & 0x3F) + 0x10000;
            if (db_text_push(out, c))
                return -1;
            i += 6;
            continue;
        }
        size_t k = utf8_one(b + i, n - i, &c);
        if (!k)
            return 1;
        if (db_text_push(out, c))
            return -1;
        i += k;
    }
    return 0;
}

/* ---- fix_encoding -------------------------------------------------------- */

typedef struct revmap {
    uint32_t cp;
    unsigned char byte;
} revmap;

static int rev_cmp(const void *a, const void *b)
{
    uint32_t x = ((const revmap *)a)->cp, y = ((const revmap *)b)->cp;
    return x < y ? -1 : x > y;
}

/* The byte that encodes c in charmap e, or -1 (chardata.possible_encoding:
 * ASCII but 0x1a encodes as itself; 0x80..0xff and 0x1a through the table). */
static int cm_encode(const revmap *rev, uint32_t c)
{
    if (c < 0x80 && c != 0x1A)
        return (int)c;
    revmap key = {c, 0};
    const revmap *r = bsearch(&key, rev, 129, sizeof *rev, rev_cmp);
    return r ? r->byte : -1;
}

static int fix_encoding(db_text *t);

/* fixes.decode_inconsistent_utf8: fix each UTF8_DETECTOR_RE match that is
 * shorter than the text and looks bad on its own.  Returns 1 when changed.
 * The recursion goes one level deeper only through a successful decode of a
 * strictly shorter piece, so its depth grows with the layers of mojibake
 * (logarithmic in the length), not with the length. */
static int decode_inconsistent_utf8(db_text *t)
{
    db_text out = {0}, sub = {0};
    const uint32_t *c = t->c;
    size_t n = t->n;
    int changed = 0;
    for (size_t p = 0; p < n;) {
        size_t q = p;
        /* (?<! [utf8_continuation_strict]) */
        if (!(p > 0 && (moji_mask(c[p - 1]) & M(U8_CONT_STRICT)))) {
            /* ([first_of_2][cont] | [first_of_3][cont]{2} | [first_of_4][cont]{3})+
             * taken greedily: nothing follows the group, so the regex's first
             * match is the one that takes the first fitting alternative each time */
            static const size_t need[3] = {1, 2, 3};
            static const uint32_t first[3] = {M(U8_FIRST2), M(U8_FIRST3), M(U8_FIRST4)};
            for (;;) {
                uint32_t m0 = q < n ? moji_mask(c[q]) : 0;
                size_t took = 0;
                for (int a = 0; a < 3 && !took; a++) {
                    if (!(m0 & first[a]))
                        continue;
                    size_t j = 1;
                    while (j <= need[a] && q + j < n && (moji_mask(c[q + j]) & M(U8_CONT)))
                        j++;
                    if (j > need[a])
                        took = need[a] + 1;
                }
                if (!took)
                    break;
                q += took;
            }
        }
        if (q == p) {
            if (db_text_push(&out, c[p++]))
                goto oom;
            continue;
        }
        sub.n = 0;
        if (db_text_append(&sub, c + p, q - p))
            goto oom;
        if (q - p < n && db_ftfy_is_bad(sub.c, sub.n)) {
            db_text before = {0};
            if (db_text_append(&before, sub.c, sub.n))
                goto oom;
            int rc = fix_encoding(&sub);
            changed |= rc == 0 && !text_eq(&before, &sub);
            db_text_free(&before);
            if (rc < 0)
                goto oom;
        }
        if (db_text_append(&out, sub.c, sub.n))
            goto oom;
        p = q;
    }
    if (changed)
        text_swap(t, &out);
    db_text_free(&out);
    db_text_free(&sub);
    return changed;
oom:
    db_text_free(&out);
    db_text_free(&sub);
    return -1;
}

/* _fix_encoding_one_step_and_explain.  Returns 0 (t possibly changed) or -1. */
static int fix_encoding_step(db_text *t)
{
    size_t n = t->n;
    int ascii = 1;
    for (size_t i = 0; i < n && ascii; i++)
        ascii = t->c[i] < 0x80;
    if (n == 0 || ascii || !db_ftfy_is_bad(t->c, n))
        return 0;

    int possible_latin1 = 0;
    bytes x = {0};
    db_text out = {0};
    for (int e = 0; e < DB_NCHARMAPS; e++) {
        revmap rev[129];
        for (int k = 0; k < 129; k++)
            rev[k] = (revmap){db_charmaps[e][k], (unsigned char)(k < 128 ? 0x80 + k : 0x1A)};
        qsort(rev, 129, sizeof *rev, rev_cmp);
        x.n = 0;
        int ok = 1;
        for (size_t i = 0; i < n && ok; i++) {
            int b = cm_encode(rev, t->c[i]);
            if (b < 0)
                ok = 0;
            else if (bytes_put(&x, (unsigned char)b))
                goto oom;
        }
        if (!ok)
            continue;
        possible_latin1 |= e == 0;
        if (altered_search(&x) && restore_byte_a0(&x))
            goto oom;
        if (!strncmp(db_charmap_names[e], "sloppy", 6) && replace_lossy_sequences(&x))
            goto oom;
        /* plain UTF-8 and utf-8-variants agree wherever the former decodes,
         * so the variants decoder serves both */
        int rc = decode_utf8_variants(&x, &out);
        if (rc < 0)
            goto oom;
        if (rc == 0) {
            text_swap(t, &out);
            free(x.b);
            db_text_free(&out);
            return 0;
        }
    }
    free(x.b);
    db_text_free(&out);

    /* look for a-hat-euro sequences that remain, and fix them in isolation */
    int rc = decode_inconsistent_utf8(t);
    if (rc < 0)
        return -1;
    if (rc > 0)
        return 0;

    /* Latin-1 meant as Windows-1252.  (ftfy's test for "windows-1252" in its
     * list never holds -- the list names "sloppy-windows-1252" -- so this
     * branch always runs for Latin-1 text.)  A strict decode fails on the
     * five bytes Windows-1252 leaves undefined. */
    if (possible_latin1) {
        int ok = 1, changed = 0;
        for (size_t i = 0; i < n && ok; i++) {
            uint32_t c = t->c[i];
            if (c == 0x81 || c == 0x8D || c == 0x8F || c == 0x90 || c == 0x9D)
                ok = 0;
            else
                changed |= c >= 0x80 && c <= 0x9F;
        }
        if (ok && changed) {
            for (size_t i = 0; i < n; i++)
                if (t->c[i] >= 0x80 && t->c[i] <= 0x9F)
                    t->c[i] = db_charmaps[1][t->c[i] - 0x80];
            return 0;
        }
    }
    /* fix_c1_controls */
    for (size_t i = 0; i < n; i++)
        if (t->c[i] >= 0x80 && t->c[i] <= 0x9F)
            t->c[i] = db_charmaps[1][t->c[i] - 0x80];
    return 0;
oom:
    free(x.b);
    db_text_free(&out);
    return -1;
}

/* fix_encoding_and_explain: one step at a time until nothing changes. */
static int fix_encoding(db_text *t)
{
    db_text prev = {0};
    size_t bound = t->n + 64;
    int rc = 0;
    for (size_t it = 0; it < bound; it++) {
        prev.n = 0;
        if (db_text_append(&prev, t->c, t->n) || fix_encoding_step(t)) {
            rc = -1;
            break;
        }
        if (text_eq(&prev, t))
            break;
    }
    db_text_free(&prev);
    return rc;
}

/* ---- the character-level fixers ------------------------------------------ */

static const db_cp_map *cp_map_find(const db_cp_map *m, size_t n, uint32_t c)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (m[mid].cp < c)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && m[lo].cp == c ? &m[lo] : NULL;
}

/* str.translate with one of the generated tables */
static int translate(const db_text *in, db_text *out, const db_cp_map *m, size_t nm)
{
    out->n = 0;
    for (size_t i = 0; i < in->n; i++) {
        const db_cp_map *e = in->c[i] >= m[0].cp ? cp_map_find(m, nm, in->c[i]) : NULL;
        if (e ? append_utf8(out, e->to) : db_text_push(out, in->c[i]))
            return -1;
    }
    return 0;
}

/* uncurl_quotes, fix_line_breaks, remove_terminal_escapes and
 * remove_control_chars, in that order, in one pass each. */
static int fix_chars(const db_text *in, db_text *out)
{
    db_text tmp = {0};
    out->n = 0;
    /* uncurl_quotes + fix_line_breaks ("\r\n", "\r", U+2028, U+2029, U+0085 -> "\n") */
    for (size_t i = 0; i < in->n; i++) {
        uint32_t c = in->c[i];
        if (c == 0x02BC || (c >= 0x2018 && c <= 0x201B))
            c = '\'';
        else if (c >= 0x201C && c <= 0x201F)
            c = '"';
        else if (c == '\r') {
            if (i + 1 < in->n && in->c[i + 1] == '\n')
                i++;
            c = '\n';
        } else if (c == 0x2028 || c == 0x2029 || c == 0x85)
            c = '\n';
        if (db_text_push(&tmp, c))
            goto oom;
    }
    /* remove_terminal_escapes: \033\[((?:\d|;)*)([a-zA-Z]) -- \d is any Nd */
    for (size_t i = 0; i < tmp.n; i++) {
        if (tmp.c[i] == 0x1B && i + 1 < tmp.n && tmp.c[i + 1] == '[') {
            size_t j = i + 2;
            while (j < tmp.n && (tmp.c[j] == ';' ||
                                 utf8proc_category((utf8proc_int32_t)tmp.c[j]) == UTF8PROC_CATEGORY_ND))
                j++;
            if (j < tmp.n && (tmp.c[j] | 0x20) >= 'a' && (tmp.c[j] | 0x20) <= 'z') {
                i = j;
                continue;
            }
        }
        uint32_t c = tmp.c[i];
        /* remove_control_chars (chardata.CONTROL_CHARS) */
        if (c <= 0x08 || c == 0x0B || (c >= 0x0E && c <= 0x1F) || c == 0x7F || (c >= 0x206A && c <= 0x206F) ||
            c == 0xFEFF || (c >= 0xFFF9 && c <= 0xFFFC))
            continue;
        if (db_text_push(out, c))
            goto oom;
    }
    db_text_free(&tmp);
    return 0;
oom:
    db_text_free(&tmp);
    return -1;
}

/* unicodedata.normalize("NFC", ...) through utf8proc: utf8proc_decompose
 * decomposes and puts marks in canonical order, utf8proc_normalize_utf32
 * composes.  (The UTF-8 detour is the only entry point that reorders.) */
static int nfc(const db_text *in, db_text *out)
{
    out->n = 0;
    if (!in->n)
        return 0;
    utf8proc_uint8_t *u8 = malloc(in->n * 4);
    if (!u8)
        return -1;
    size_t len = 0;
    for (size_t i = 0; i < in->n; i++)
        len += db_utf8_put((char *)u8 + len, in->c[i]);
    utf8proc_option_t opt = UTF8PROC_STABLE | UTF8PROC_COMPOSE;
    utf8proc_ssize_t need = utf8proc_decompose(u8, (utf8proc_ssize_t)len, NULL, 0, opt), r = -1;
    if (need >= 0 && !db_text_reserve(out, (size_t)need + 1)) {
        r = utf8proc_decompose(u8, (utf8proc_ssize_t)len, (utf8proc_int32_t *)out->c, need, opt);
        if (r >= 0)
            r = utf8proc_normalize_utf32((utf8proc_int32_t *)out->c, r, opt);
    }
    free(u8);
    if (r < 0)
        return -1;
    out->n = (size_t)r;
    return 0;
}

/* fix_and_explain for one segment: the fixers in ftfy's order until the
 * text stops changing. */
static int fix_segment(db_text *t, int unescape)
{
    db_text orig = {0}, tmp = {0};
    size_t bound = t->n + 64;
    int rc = -1;
    for (size_t it = 0; it < bound; it++) {
        orig.n = 0;
        if (db_text_append(&orig, t->c, t->n))
            goto out;
        if (unescape) {
            if (unescape_html(t, &tmp))
                goto out;
            text_swap(t, &tmp);
        }
        if (fix_encoding(t))
            goto out;
        for (size_t i = 0; i < t->n; i++) /* fix_c1_controls */
            if (t->c[i] >= 0x80 && t->c[i] <= 0x9F)
                t->c[i] = db_charmaps[1][t->c[i] - 0x80];
        if (translate(t, &tmp, db_ftfy_ligatures, db_ftfy_ligatures_n))
            goto out;
        text_swap(t, &tmp);
        if (translate(t, &tmp, db_ftfy_width, db_ftfy_width_n))
            goto out;
        text_swap(t, &tmp);
        if (fix_chars(t, &tmp))
            goto out;
        text_swap(t, &tmp);
        if (nfc(t, &tmp))
            goto out;
        text_swap(t, &tmp);
        if (text_eq(&orig, t))
            break;
    }
    rc = 0;
out:
    db_text_free(&orig);
    db_text_free(&tmp);
    return rc;
}

int db_ftfy_fix_text(db_text *t, db_err *err)
{
    /* ftfy fixes "\n"-terminated segments (of at most max_decode_length
     * characters) one by one.  Once a segment contains '<', the text is
     * taken to be HTML and entities stay as they are from there on. */
    const size_t max_decode_length = 1000000;
    db_text out = {0}, seg = {0};
    int unescape = 1;
    for (size_t pos = 0; pos < t->n;) {
        size_t end = pos;
        while (end < t->n && t->c[end] != '\n')
            end++;
        end = end < t->n ? end + 1 : end;
        if (end - pos > max_decode_length)
            end = pos + max_decode_length;
        seg.n = 0;
        if (db_text_append(&seg, t->c + pos, end - pos))
            goto oom;
        for (size_t i = 0; i < seg.n && unescape; i++)
            unescape = seg.c[i] != '<';
        if (fix_segment(&seg, unescape) || db_text_append(&out, seg.c, seg.n))
            goto oom;
        pos = end;
    }
    text_swap(t, &out);
    db_text_free(&out);
    db_text_free(&seg);
    return 0;
oom:
    db_text_free(&out);
    db_text_free(&seg);
    return db_err_set(err, DB_ENOMEM, "text clean-up: out of memory");
}

/* ---- whitespace_clean + str.lower() --------------------------------------- */

/* Python's "cased" and "case-ignorable" (unicodectype.c flags), used for the
 * final-sigma rule: the general categories plus these extra ranges (Unicode
 * 14, from Python 3.11's tables). */
static const uint32_t other_cased[][2] = {
    {0xAA, 0xAA}, {0xBA, 0xBA}, {0x2B0, 0x2B8}, {0x2C0, 0x2C1}, {0x2E0, 0x2E4}, {0x345, 0x345},
    {0x37A, 0x37A}, {0x1D2C, 0x1D6A}, {0x1D78, 0x1D78}, {0x1D9B, 0x1DBF}, {0x2071, 0x2071},
    {0x207F, 0x207F}, {0x2090, 0x209C}, {0x2160, 0x217F}, {0x24B6, 0x24E9}, {0x2C7C, 0x2C7D},
    {0xA69C, 0xA69D}, {0xA770, 0xA770}, {0xA7F8, 0xA7F9}, {0xAB5C, 0xAB5F}, {0x10780, 0x10780},
    {0x10783, 0x10785}, {0x10787, 0x107B0}, {0x107B2, 0x107BA}, {0x1F130, 0x1F149}, {0x1F150, 0x1F169},
    {0x1F170, 0x1F189},
};
/* Word_Break MidLetter / MidNumLet / Single_Quote */
static const uint32_t other_case_ignorable[] = {0x27,   0x2E,   0x3A,   0xB7,   0x387,  0x55F,
                                                0x5F4,  0x2018, 0x2019, 0x2024, 0x2027, 0xFE13,
                                                0xFE52, 0xFE55, 0xFF07, 0xFF0E, 0xFF1A};

static int py_cased(uint32_t c)
{
    utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
    if (k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LL || k == UTF8PROC_CATEGORY_LT)
        return 1;
    for (size_t i = 0; i < sizeof other_cased / sizeof other_cased[0]; i++)
        if (c >= other_cased[i][0] && c <= other_cased[i][1])
            return 1;
    return 0;
}

static int py_case_ignorable(uint32_t c)
{
    switch (utf8proc_category((utf8proc_int32_t)c)) {
    case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_ME: case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_SK:
        return 1;
    default:
        break;
    }
    for (size_t i = 0; i < sizeof other_case_ignorable / sizeof other_case_ignorable[0]; i++)
        if (c == other_case_ignorable[i])
            return 1;
    return 0;
}

/* Python's handle_capital_sigma: Σ lowers to ς when a cased letter precedes
 * it (case-ignorables skipped) and none follows. */
static int final_sigma(const uint32_t *c, size_t n, size_t i)
{
    size_t j = i;
    while (j > 0 && py_case_ignorable(c[j - 1]))
        j--;
    if (j == 0 || !py_cased(c[j - 1]))
        return 0;
    j = i + 1;
    while (j < n && py_case_ignorable(c[j]))
        j++;
    return j == n || !py_cased(c[j]);
}

int db_clip_clean_lower(db_text *t, db_err *err)
{
    /* re.sub(r"\s+", " ") with the regex module's \s (White_Space) */
    db_text ws = {0}, out = {0};
    for (size_t i = 0; i < t->n;) {
        if (db_uni_is_white_space(t->c[i])) {
            while (i < t->n && db_uni_is_white_space(t->c[i]))
                i++;
            if (db_text_push(&ws, ' '))
                goto oom;
        } else if (db_text_push(&ws, t->c[i++])) {
            goto oom;
        }
    }
    /* str.strip() */
    size_t a = 0, b = ws.n;
    while (a < b && py_isspace(ws.c[a]))
        a++;
    while (b > a && py_isspace(ws.c[b - 1]))
        b--;
    /* str.lower(): the full mapping, whose only multi-character lowercase is
     * İ -> i + U+0307, and the final-sigma rule; else the simple mapping */
    for (size_t i = a; i < b; i++) {
        uint32_t c = ws.c[i];
        int rc;
        if (c == 0x130)
            rc = db_text_push(&out, 'i') || db_text_push(&out, 0x307);
        else if (c == 0x3A3)
            rc = db_text_push(&out, final_sigma(ws.c + a, b - a, i - a) ? 0x3C2 : 0x3C3);
        else
            rc = db_text_push(&out, (uint32_t)utf8proc_tolower((utf8proc_int32_t)c));
        if (rc)
            goto oom;
    }
    text_swap(t, &out);
    db_text_free(&ws);
    db_text_free(&out);
    return 0;
oom:
    db_text_free(&ws);
    db_text_free(&out);
    return db_err_set(err, DB_ENOMEM, "text clean-up: out of memory");
}
