/* CLIP BPE tokenizer (see tokenizer.h).  Follows transformers'
 * models/clip/tokenization_clip.py and PreTrainedTokenizer.tokenize; the
 * text clean-up is textfix.c. */
#include "tokenizer.h"

#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/fsutil.h"
#include "textfix.h"

/* CLIPTokenizer reads merges.txt lines 1 .. 49152 - 256 - 2: the vocabulary
 * is 256 bytes x 2 (with and without "</w>"), the merges, and the two
 * special tokens.  SD's merges.txt has exactly that many. */
#define CLIP_MAX_MERGES (49152 - 256 - 2)
#define MAX_VOCAB_ID (1 << 24)     /* sanity bound on ids in vocab.json */
#define CACHE_SLOTS 16384           /* BPE cache: at most half used, then cleared */
#define CACHE_MAX_KEY 64            /* longer words are not cached */
static const char SOT[] = "<|startoftext|>", EOT[] = "<|endoftext|>";

/* ---- interned strings: every vocab token, merge part and merge result ---- */

typedef struct strtab {
    char *pool; /* NUL-terminated strings back to back */
    size_t pool_n, pool_cap;
    uint32_t *off;   /* per piece: offset into pool */
    uint32_t *len;   /* per piece: byte length */
    int32_t *vocab;  /* per piece: vocab id, or -1 */
    size_t n, cap;
    uint32_t *slot;  /* open addressing: piece index + 1, 0 = empty */
    size_t nslot;    /* power of two */
} strtab;

static uint64_t hash_bytes(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}

static int32_t st_find(const strtab *st, const char *s, size_t n)
{
    if (!st->nslot)
        return -1;
    for (size_t i = hash_bytes(s, n) & (st->nslot - 1);; i = (i + 1) & (st->nslot - 1)) {
        uint32_t v = st->slot[i];
        if (!v)
            return -1;
        if (st->len[v - 1] == n && !memcmp(st->pool + st->off[v - 1], s, n))
            return (int32_t)(v - 1);
    }
}

static int st_rehash(strtab *st, size_t nslot)
{
    uint32_t *slot = calloc(nslot, sizeof *slot);
    if (!slot)
        return -1;
    for (size_t p = 0; p < st->n; p++) {
        size_t i = hash_bytes(st->pool + st->off[p], st->len[p]) & (nslot - 1);
        while (slot[i])
            i = (i + 1) & (nslot - 1);
        slot[i] = (uint32_t)p + 1;
    }
    free(st->slot);
    st->slot = slot;
    st->nslot = nslot;
    return 0;
}

/* The piece index of s, added when new (vocab id -1).  -1 when out of memory. */
static int32_t st_intern(strtab *st, const char *s, size_t n)
{
    int32_t f = st_find(st, s, n);
    if (f >= 0)
        return f;
    if (st->n + 1 > st->nslot / 2 && st_rehash(st, st->nslot ? st->nslot * 2 : 1024))
        return -1;
    if (st->n == st->cap) {
        size_t cap = st->cap ? st->cap * 2 : 1024;
        uint32_t *off = realloc(st->off, cap * sizeof *off);
        if (off)
            st->off = off;
        uint32_t *len = realloc(st->len, cap * sizeof *len);
        if (len)
            st->len = len;
        int32_t *vocab = realloc(st->vocab, cap * sizeof *vocab);
        if (vocab)
            st->vocab = vocab;
        if (!off || !len || !vocab)
            return -1;
        st->cap = cap;
    }
    if (st->pool_n + n + 1 > st->pool_cap || st->pool_n + n + 1 > UINT32_MAX) {
        size_t cap = st->pool_cap ? st->pool_cap : 1 << 16;
        while (cap < st->pool_n + n + 1)
            cap *= 2;
        char *pool = cap <= UINT32_MAX ? realloc(st->pool, cap) : NULL;
        if (!pool)
            return -1;
        st->pool = pool;
        st->pool_cap = cap;
    }
    memcpy(st->pool + st->pool_n, s, n);
    st->pool[st->pool_n + n] = 0;
    st->off[st->n] = (uint32_t)st->pool_n;
    st->len[st->n] = (uint32_t)n;
    st->vocab[st->n] = -1;
    st->pool_n += n + 1;
    size_t i = hash_bytes(s, n) & (st->nslot - 1);
    while (st->slot[i])
        i = (i + 1) & (st->nslot - 1);
    st->slot[i] = (uint32_t)st->n + 1;
    return (int32_t)st->n++;
}

static void st_free(strtab *st)
{
    free(st->pool);
    free(st->off);
    free(st->len);
    free(st->vocab);
    free(st->slot);
}

/* ---- merge ranks: (left piece, right piece) -> rank, merged piece -------- */

typedef struct pairtab {
    uint64_t *key; /* left << 32 | right */
    uint32_t *rank; /* UINT32_MAX = empty slot */
    int32_t *merged;
    size_t nslot, n;
} pairtab;

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

static int pt_init(pairtab *pt, size_t nmerges)
{
    size_t nslot = 1024;
    while (nslot < 2 * nmerges + 2)
        nslot *= 2;
    pt->key = malloc(nslot * sizeof *pt->key);
    pt->rank = malloc(nslot * sizeof *pt->rank);
    pt->merged = malloc(nslot * sizeof *pt->merged);
    if (!pt->key || !pt->rank || !pt->merged)
        return -1;
    memset(pt->rank, 0xFF, nslot * sizeof *pt->rank);
    pt->nslot = nslot;
    return 0;
}

/* A later duplicate overwrites the rank, as Python's dict(zip(merges, range)). */
static void pt_put(pairtab *pt, int32_t a, int32_t b, uint32_t rank, int32_t merged)
{
    uint64_t k = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    size_t i = mix64(k) & (pt->nslot - 1);
    while (pt->rank[i] != UINT32_MAX && pt->key[i] != k)
        i = (i + 1) & (pt->nslot - 1);
    pt->n += pt->rank[i] == UINT32_MAX;
    pt->key[i] = k;
    pt->rank[i] = rank;
    pt->merged[i] = merged;
}

/* The rank of merging a and b, or UINT32_MAX. */
static uint32_t pt_get(const pairtab *pt, int32_t a, int32_t b, int32_t *merged)
{
    if (a < 0 || b < 0)
        return UINT32_MAX;
    uint64_t k = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    for (size_t i = mix64(k) & (pt->nslot - 1); pt->rank[i] != UINT32_MAX; i = (i + 1) & (pt->nslot - 1))
        if (pt->key[i] == k) {
            *merged = pt->merged[i];
            return pt->rank[i];
        }
    return UINT32_MAX;
}

static void pt_free(pairtab *pt)
{
    free(pt->key);
    free(pt->rank);
    free(pt->merged);
}

/* ---- the BPE cache ---------------------------------------------------------- */

typedef struct cache_ent {
    uint64_t h;
    char *key; /* key bytes, then the ids (one allocation) */
    uint32_t klen, nids;
    const int32_t *ids;
} cache_ent;

typedef struct bpe_cache {
    pthread_mutex_t mu;
    cache_ent *slot; /* CACHE_SLOTS, key NULL = empty */
    size_t n;
} bpe_cache;

static void cache_clear(bpe_cache *c)
{
    for (size_t i = 0; i < CACHE_SLOTS; i++)
        free(c->slot[i].key);
    memset(c->slot, 0, CACHE_SLOTS * sizeof *c->slot);
    c->n = 0;
}

/* ---- the tokenizer ------------------------------------------------------------ */

typedef struct special {
    char *text;
    int32_t id;
} special;

struct db_tokenizer {
    strtab st;
    pairtab pt;
    int32_t *id_piece; /* id -> piece index, -1 where no token has that id */
    size_t nid;        /* max id + 1 */
    size_t vocab_size, n_merges;
    int32_t base[256], base_w[256]; /* piece of each byte's character, alone / + "</w>" */
    int32_t bos, eos, pad, unk;
    int32_t sot_id, eot_id;         /* what the regex's "<|startoftext|>"/"<|endoftext|>" map to */
    special *split; /* special and added tokens: text cut out of the prompt before clean-up */
    size_t nsplit;
    bpe_cache *cache;
};

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the
 * other 68 to U+0100.. in byte order, so no byte becomes whitespace or a
 * control character. */
static uint32_t byte_char(unsigned b)
{
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF))
        return b;
    uint32_t n = 0;
    for (unsigned x = 0; x < b; x++)
        n += !((x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF));
    return 256 + n;
}

void db_tokenizer_free(db_tokenizer *tok)
{
    if (!tok)
        return;
    st_free(&tok->st);
    pt_free(&tok->pt);
    free(tok->id_piece);
    for (size_t i = 0; i < tok->nsplit; i++)
        free(tok->split[i].text);
    free(tok->split);
    if (tok->cache) {
        if (tok->cache->slot) {
            cache_clear(tok->cache);
            free(tok->cache->slot);
        }
        pthread_mutex_destroy(&tok->cache->mu);
        free(tok->cache);
    }
    free(tok);
}

static int oom(db_err *err, const char *what)
{
    return db_err_set(err, DB_ENOMEM, "%s: out of memory", what);
}

static int load_vocab(db_tokenizer *tok, const char *path, db_err *err)
{
    json_error_t je;
    json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!j) {
        if (!db_exists(path))
            return db_err_set(err, DB_EIO, "%s: missing (a tokenizer needs vocab.json and merges.txt)", path);
        return db_err_set(err, DB_EFORMAT, "%s: line %d: %s", path, je.line, je.text);
    }
    int rc = -1;
    if (!json_is_object(j)) {
        db_err_set(err, DB_EFORMAT, "%s: not a JSON object of token -> id", path);
        goto out;
    }
    const char *key;
    json_t *v;
    size_t maxid = 0;
    json_object_foreach(j, key, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= MAX_VOCAB_ID) {
            db_err_set(err, DB_EFORMAT, "%s: token '%.64s': id is not an integer in [0, %d)", path, key,
                       MAX_VOCAB_ID);
            goto out;
        }
        size_t id = (size_t)json_integer_value(v);
        maxid = id > maxid ? id : maxid;
    }
    tok->nid = json_object_size(j) ? maxid + 1 : 0;
    tok->id_piece = malloc((tok->nid + 1) * sizeof *tok->id_piece);
    if (!tok->id_piece) {
        oom(err, path);
        goto out;
    }
    memset(tok->id_piece, 0xFF, (tok->nid + 1) * sizeof *tok->id_piece);
    json_object_foreach(j, key, v) {
        int32_t id = (int32_t)json_integer_value(v);
        if (tok->id_piece[id] >= 0) {
            db_err_set(err, DB_EFORMAT, "%s: tokens '%.64s' and '%.64s' both have id %d", path,
                       tok->st.pool + tok->st.off[tok->id_piece[id]], key, (int)id);
            goto out;
        }
        int32_t p = st_intern(&tok->st, key, strlen(key));
        if (p < 0) {
            oom(err, path);
            goto out;
        }
        if (tok->st.vocab[p] >= 0) { /* only keys that differ after a NUL can collide */
            db_err_set(err, DB_EFORMAT, "%s: token '%.64s' appears twice", path, key);
            goto out;
        }
        tok->st.vocab[p] = id;
        tok->id_piece[id] = p;
    }
    tok->vocab_size = json_object_size(j);
    rc = 0;
out:
    json_decref(j);
    return rc;
}

static int is_ascii_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f';
}

static int load_merges(db_tokenizer *tok, const char *path, db_err *err)
{
    char *buf;
    size_t len;
    if (!db_exists(path))
        return db_err_set(err, DB_EIO, "%s: missing (a tokenizer needs vocab.json and merges.txt)", path);
    if (db_read_file(path, (size_t)64 << 20, &buf, &len, err))
        return -1;
    int rc = -1;
    db_text scratch = {0};
    size_t bad;
    if (db_utf8_decode(&scratch, buf, len, &bad)) {
        size_t line = 1;
        for (size_t i = 0; i < bad; i++)
            line += buf[i] == '\n';
        if (errno == ENOMEM)
            oom(err, path);
        else
            db_err_set(err, DB_EFORMAT, "%s: line %zu: invalid UTF-8", path, line);
        goto out;
    }
    db_text_free(&scratch);
    /* Python: read().strip().split("\n")[1:CLIP_MAX_MERGES + 1] */
    size_t i = 0, lineno = 1;
    while (i < len && (is_ascii_space(buf[i]) || buf[i] == '\n'))
        lineno += buf[i++] == '\n';
    if (strncmp(buf + i, "#version", 8)) {
        db_err_set(err, DB_EFORMAT, "%s: line %zu: expected the '#version: ...' header", path, lineno);
        goto out;
    }
    while (i < len && buf[i] != '\n')
        i++;
    size_t end = len;
    while (end > i && (is_ascii_space(buf[end - 1]) || buf[end - 1] == '\n'))
        end--;
    if (pt_init(&tok->pt, CLIP_MAX_MERGES)) {
        oom(err, path);
        goto out;
    }
    char cat[2048];
    while (i < end && tok->n_merges < CLIP_MAX_MERGES) {
        i++; /* the '\n' */
        lineno++;
        size_t e = i;
        while (e < end && buf[e] != '\n')
            e++;
        /* str.split(): fields between runs of whitespace */
        const char *f[3];
        size_t fl[3], nf = 0;
        for (size_t k = i; k < e;) {
            while (k < e && is_ascii_space(buf[k]))
                k++;
            if (k == e)
                break;
            size_t s = k;
            while (k < e && !is_ascii_space(buf[k]))
                k++;
            if (nf < 3) {
                f[nf] = buf + s;
                fl[nf] = k - s;
            }
            nf++;
        }
        if (nf != 2) {
            db_err_set(err, DB_EFORMAT, "%s: line %zu: expected two tokens separated by a space, found %zu", path,
                       lineno, nf);
            goto out;
        }
        if (fl[0] + fl[1] >= sizeof cat) {
            db_err_set(err, DB_EFORMAT, "%s: line %zu: token too long", path, lineno);
            goto out;
        }
        memcpy(cat, f[0], fl[0]);
        memcpy(cat + fl[0], f[1], fl[1]);
        int32_t a = st_intern(&tok->st, f[0], fl[0]);
        int32_t b = a < 0 ? -1 : st_intern(&tok->st, f[1], fl[1]);
        int32_t m = b < 0 ? -1 : st_intern(&tok->st, cat, fl[0] + fl[1]);
        if (m < 0) {
            oom(err, path);
            goto out;
        }
        pt_put(&tok->pt, a, b, (uint32_t)tok->n_merges++, m);
        i = e;
    }
    rc = 0;
out:
    db_text_free(&scratch);
    free(buf);
    return rc;
}

/* A special token's text from tokenizer_config.json / special_tokens_map.json:
 * a string or {"content": string}.  0: found (*out set), 1: absent, -1: error. */
static int special_text(json_t *cfg, const char *key, const char *path, const char **out, db_err *err)
{
    json_t *v = cfg ? json_object_get(cfg, key) : NULL;
    if (!v || json_is_null(v))
        return 1;
    if (json_is_object(v))
        v = json_object_get(v, "content");
    if (!json_is_string(v))
        return db_err_set(err, DB_EFORMAT, "%s: '%s' is neither a string nor {\"content\": string}", path, key);
    *out = json_string_value(v);
    return 0;
}

static int add_split(db_tokenizer *tok, const char *text, int32_t id, db_err *err)
{
    for (size_t i = 0; i < tok->nsplit; i++)
        if (!strcmp(tok->split[i].text, text))
            return 0;
    if (!*text)
        return 0;
    special *sp = realloc(tok->split, (tok->nsplit + 1) * sizeof *sp);
    if (!sp)
        return oom(err, "tokenizer");
    tok->split = sp;
    if (!(tok->split[tok->nsplit].text = strdup(text)))
        return oom(err, "tokenizer");
    tok->split[tok->nsplit++].id = id;
    return 0;
}

static int load_specials(db_tokenizer *tok, const char *dir, db_err *err)
{
    /* transformers reads tokenizer_config.json, then special_tokens_map.json
     * overrides it; CLIPTokenizer's defaults fill what neither gives */
    static const char *const files[] = {"tokenizer_config.json", "special_tokens_map.json"};
    static const char *const keys[] = {"bos_token", "eos_token", "unk_token", "pad_token"};
    const char *text[4] = {SOT, EOT, EOT, EOT};
    json_t *cfg[2] = {0};
    char path[2][4096];
    int rc = -1;
    for (int f = 0; f < 2; f++) {
        snprintf(path[f], sizeof path[f], "%s/%s", dir, files[f]);
        if (!db_exists(path[f]))
            continue;
        json_error_t je;
        if (!(cfg[f] = json_load_file(path[f], 0, &je))) {
            db_err_set(err, DB_EFORMAT, "%s: line %d: %s", path[f], je.line, je.text);
            goto out;
        }
        if (!json_is_object(cfg[f])) {
            db_err_set(err, DB_EFORMAT, "%s: not a JSON object", path[f]);
            goto out;
        }
        for (int k = 0; k < 4; k++)
            if (special_text(cfg[f], keys[k], path[f], &text[k], err) < 0)
                goto out;
    }
    int32_t *ids[4] = {&tok->bos, &tok->eos, &tok->unk, &tok->pad};
    for (int k = 0; k < 4; k++) {
        int32_t p = st_find(&tok->st, text[k], strlen(text[k]));
        if (p < 0 || tok->st.vocab[p] < 0) {
            db_err_set(err, DB_EFORMAT, "%s/vocab.json: %s '%.64s' is not in the vocabulary", dir, keys[k], text[k]);
            goto out;
        }
        *ids[k] = tok->st.vocab[p];
        if (add_split(tok, text[k], *ids[k], err))
            goto out;
    }
    /* the two strings CLIPTokenizer's BPE cache maps to themselves */
    int32_t p = st_find(&tok->st, SOT, strlen(SOT));
    tok->sot_id = p >= 0 && tok->st.vocab[p] >= 0 ? tok->st.vocab[p] : tok->unk;
    p = st_find(&tok->st, EOT, strlen(EOT));
    tok->eot_id = p >= 0 && tok->st.vocab[p] >= 0 ? tok->st.vocab[p] : tok->unk;
    rc = 0;
out:
    json_decref(cfg[0]);
    json_decref(cfg[1]);
    return rc;
}

/* added_tokens.json (textual-inversion style tokens): each splits the prompt
 * like a special token and maps to its id. */
static int load_added(db_tokenizer *tok, const char *dir, db_err *err)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/added_tokens.json", dir);
    if (!db_exists(path))
        return 0;
    json_error_t je;
    json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!j)
        return db_err_set(err, DB_EFORMAT, "%s: line %d: %s", path, je.line, je.text);
    int rc = -1;
    const char *key;
    json_t *v;
    if (!json_is_object(j)) {
        db_err_set(err, DB_EFORMAT, "%s: not a JSON object of token -> id", path);
        goto out;
    }
    json_object_foreach(j, key, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= MAX_VOCAB_ID) {
            db_err_set(err, DB_EFORMAT, "%s: token '%.64s': id is not an integer in [0, %d)", path, key,
                       MAX_VOCAB_ID);
            goto out;
        }
        int32_t id = (int32_t)json_integer_value(v), p = st_find(&tok->st, key, strlen(key));
        if (p >= 0 && tok->st.vocab[p] >= 0 && tok->st.vocab[p] != id) {
            db_err_set(err, DB_EFORMAT, "%s: '%.64s' has id %d here but %d in vocab.json", path, key, (int)id,
                       (int)tok->st.vocab[p]);
            goto out;
        }
        if ((size_t)id < tok->nid && tok->id_piece[id] >= 0 && (p < 0 || tok->id_piece[id] != p)) {
            db_err_set(err, DB_EFORMAT, "%s: id %d of '%.64s' is already taken", path, (int)id, key);
            goto out;
        }
        if ((size_t)id >= tok->nid) {
            int32_t *idp = realloc(tok->id_piece, ((size_t)id + 2) * sizeof *idp);
            if (!idp) {
                oom(err, path);
                goto out;
            }
            for (size_t k = tok->nid; k <= (size_t)id + 1; k++)
                idp[k] = -1;
            tok->id_piece = idp;
            tok->nid = (size_t)id + 1;
        }
        if ((p = st_intern(&tok->st, key, strlen(key))) < 0) {
            oom(err, path);
            goto out;
        }
        tok->st.vocab[p] = id;
        tok->id_piece[id] = p;
        if (add_split(tok, key, id, err))
            goto out;
    }
    rc = 0;
out:
    json_decref(j);
    return rc;
}

int db_tokenizer_load(db_tokenizer **out, const char *dir, db_err *err)
{
    *out = NULL;
    db_tokenizer *tok = calloc(1, sizeof *tok);
    if (!tok)
        return oom(err, dir);
    char path[4096];
    snprintf(path, sizeof path, "%s/vocab.json", dir);
    if (load_vocab(tok, path, err))
        goto fail;
    snprintf(path, sizeof path, "%s/merges.txt", dir);
    if (load_merges(tok, path, err) || load_specials(tok, dir, err) || load_added(tok, dir, err))
        goto fail;
    for (unsigned b = 0; b < 256; b++) {
        char s[16];
        size_t k = db_utf8_put(s, byte_char(b));
        tok->base[b] = st_find(&tok->st, s, k);
        memcpy(s + k, "</w>", 4);
        tok->base_w[b] = st_find(&tok->st, s, k + 4);
    }
    if (!(tok->cache = calloc(1, sizeof *tok->cache)) ||
        !(tok->cache->slot = calloc(CACHE_SLOTS, sizeof *tok->cache->slot))) {
        oom(err, dir);
        goto fail;
    }
    pthread_mutex_init(&tok->cache->mu, NULL);
    *out = tok;
    return 0;
fail:
    if (tok->cache && !tok->cache->slot) {
        free(tok->cache);
        tok->cache = NULL;
    }
    db_tokenizer_free(tok);
    return -1;
}

int db_tokenizer_load_default(db_tokenizer **out, const char *model_dir, const char *data_dir, db_err *err)
{
    if (model_dir)
        return db_tokenizer_load(out, model_dir, err);
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/clip/sd-tokenizer", data_dir ? data_dir : ".");
    if (db_tokenizer_load(out, dir, err))
        return db_err_prefix(err, "built-in CLIP vocabulary (set DB_DATA_DIR to the project's data/ folder)");
    return 0;
}

void db_tokenizer_get_info(const db_tokenizer *tok, db_tokenizer_info *info)
{
    info->bos = tok->bos;
    info->eos = tok->eos;
    info->pad = tok->pad;
    info->unk = tok->unk;
    info->vocab_size = tok->vocab_size;
    info->n_merges = tok->n_merges;
}

int32_t db_tokenizer_id(const db_tokenizer *tok, const char *token)
{
    int32_t p = st_find(&tok->st, token, strlen(token));
    return p < 0 ? -1 : tok->st.vocab[p];
}

const char *db_tokenizer_token(const db_tokenizer *tok, int32_t id)
{
    if (id < 0 || (size_t)id >= tok->nid || tok->id_piece[id] < 0)
        return NULL;
    return tok->st.pool + tok->st.off[tok->id_piece[id]];
}

/* ---- BPE ---------------------------------------------------------------------- */

typedef struct idvec {
    int32_t *v;
    size_t n, cap;
} idvec;

static int idv_push(idvec *x, int32_t id)
{
    if (x->n == x->cap) {
        size_t cap = x->cap ? 2 * x->cap : 64;
        int32_t *v = realloc(x->v, cap * sizeof *v);
        if (!v)
            return -1;
        x->v = v;
        x->cap = cap;
    }
    x->v[x->n++] = id;
    return 0;
}

typedef struct cand {
    uint32_t rank, pos;
} cand;

static int cand_less(cand a, cand b)
{
    return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos);
}

static void heap_push(cand *h, size_t *n, cand c)
{
    size_t i = (*n)++;
    while (i && cand_less(c, h[(i - 1) / 2])) {
        h[i] = h[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h[i] = c;
}

static cand heap_pop(cand *h, size_t *n)
{
    cand top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t k = 2 * i + 1;
        if (k >= *n)
            break;
        if (k + 1 < *n && cand_less(h[k + 1], h[k]))
            k++;
        if (!cand_less(h[k], last))
            break;
        h[i] = h[k];
        i = k;
    }
    if (*n)
        h[i] = last;
    return top;
}

/* Byte-level BPE of one word (its UTF-8 bytes), as CLIPTokenizer.bpe: while
 * some adjacent pair has a merge rule, merge every occurrence of the
 * lowest-ranked pair, left to right.  A heap ordered by (rank, position)
 * finds it in O(n log n); pairs created by a round of merges enter the heap
 * only after that round, as Python would see them. */
static int bpe_word(const db_tokenizer *tok, const unsigned char *w, size_t n, idvec *out)
{
    if (n == sizeof SOT - 1 && !memcmp(w, SOT, n))
        return idv_push(out, tok->sot_id);
    if (n == sizeof EOT - 1 && !memcmp(w, EOT, n))
        return idv_push(out, tok->eot_id);

    bpe_cache *c = tok->cache;
    uint64_t h = hash_bytes(w, n);
    if (n <= CACHE_MAX_KEY) {
        int hit = 0;
        pthread_mutex_lock(&c->mu);
        for (size_t i = h & (CACHE_SLOTS - 1); c->slot[i].key; i = (i + 1) & (CACHE_SLOTS - 1)) {
            cache_ent *e = &c->slot[i];
            if (e->h == h && e->klen == n && !memcmp(e->key, w, n)) {
                hit = 1;
                for (uint32_t k = 0; k < e->nids && hit; k++)
                    hit = !idv_push(out, e->ids[k]) ? 1 : -1;
                break;
            }
        }
        pthread_mutex_unlock(&c->mu);
        if (hit)
            return hit > 0 ? 0 : -1;
    }

    int32_t *piece = malloc(n * sizeof *piece), *next = malloc(n * sizeof *next),
            *prev = malloc(n * sizeof *prev);
    uint32_t *merged = malloc(n * sizeof *merged);
    cand *heap = malloc((3 * n + 4) * sizeof *heap);
    size_t first = out->n;
    int rc = -1;
    if (!piece || !next || !prev || !merged || !heap)
        goto done;
    for (size_t i = 0; i < n; i++) {
        piece[i] = i + 1 < n ? tok->base[w[i]] : tok->base_w[w[i]];
        next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
        prev[i] = (int32_t)i - 1;
    }
    size_t nh = 0;
    int32_t m;
    for (size_t i = 0; i + 1 < n; i++) {
        uint32_t r = pt_get(&tok->pt, piece[i], piece[i + 1], &m);
        if (r != UINT32_MAX)
            heap_push(heap, &nh, (cand){r, (uint32_t)i});
    }
    while (nh) {
        uint32_t r = heap[0].rank;
        size_t nm = 0;
        while (nh && heap[0].rank == r) {
            cand e = heap_pop(heap, &nh);
            int32_t i = (int32_t)e.pos, j = next[i];
            /* stale entries: the left symbol was absorbed (piece -1 marks it),
             * or the pair changed since it was pushed */
            if (piece[i] == INT32_MIN || j < 0 || pt_get(&tok->pt, piece[i], piece[j], &m) != r)
                continue;
            piece[i] = m;
            piece[j] = INT32_MIN;
            next[i] = next[j];
            if (next[j] >= 0)
                prev[next[j]] = i;
            merged[nm++] = (uint32_t)i;
        }
        for (size_t k = 0; k < nm; k++) {
            int32_t i = (int32_t)merged[k];
            if (piece[i] == INT32_MIN)
                continue;
            uint32_t rr;
            if (prev[i] >= 0 && (rr = pt_get(&tok->pt, piece[prev[i]], piece[i], &m)) != UINT32_MAX)
                heap_push(heap, &nh, (cand){rr, (uint32_t)prev[i]});
            if (next[i] >= 0 && (rr = pt_get(&tok->pt, piece[i], piece[next[i]], &m)) != UINT32_MAX)
                heap_push(heap, &nh, (cand){rr, (uint32_t)i});
        }
    }
    for (int32_t i = 0; i >= 0; i = next[i]) {
        int32_t id = piece[i] >= 0 ? tok->st.vocab[piece[i]] : -1;
        if (idv_push(out, id >= 0 ? id : tok->unk))
            goto done;
    }
    rc = 0;

    if (n <= CACHE_MAX_KEY) {
        /* one block: the key bytes, padded to int32_t alignment, then the ids */
        size_t nids = out->n - first, koff = (n + 3) / 4 * 4;
        char *blk = malloc(koff + nids * sizeof(int32_t) + 1);
        if (blk) {
            memcpy(blk, w, n);
            memcpy(blk + koff, out->v + first, nids * sizeof(int32_t));
            pthread_mutex_lock(&c->mu);
            if (c->n + 1 > CACHE_SLOTS / 2)
                cache_clear(c); /* bounded: start again rather than grow */
            size_t i = h & (CACHE_SLOTS - 1);
            int dup = 0;
            for (; c->slot[i].key && !dup; i = (i + 1) & (CACHE_SLOTS - 1))
                dup = c->slot[i].h == h && c->slot[i].klen == n && !memcmp(c->slot[i].key, w, n);
            if (!dup) { /* (another thread may have been first) */
                c->slot[i] = (cache_ent){h, blk, (uint32_t)n, (uint32_t)nids, (const int32_t *)(blk + koff)};
                c->n++;
                blk = NULL;
            }
            pthread_mutex_unlock(&c->mu);
            free(blk);
        }
    }
done:
    free(piece);
    free(next);
    free(prev);
    free(merged);
    free(heap);
    return rc;
}

/* ---- pre-tokenizer --------------------------------------------------------------- */

/* Case-insensitive match of an ASCII literal, as the `regex` module's
 * IGNORECASE sees it: ASCII case, and U+017F (long s) for 's'. */
static int fold_eq(uint32_t c, char l)
{
    return c == (uint32_t)l || (l >= 'a' && l <= 'z' && c == (uint32_t)(l - 32)) || (l == 's' && c == 0x17F);
}

static size_t match_lit(const db_text *t, size_t i, const char *lit)
{
    size_t k = 0;
    for (; lit[k]; k++)
        if (i + k >= t->n || !fold_eq(t->c[i + k], lit[k]))
            return 0;
    return k;
}

/* U+0345 (combining ypogegrammeni) case-folds to a letter, so under
 * IGNORECASE it matches neither [\p{L}] nor [^\s\p{L}\p{N}]: no alternative
 * takes it and it drops out, like whitespace. */
static int other_char(uint32_t c)
{
    return c != 0x345 && !db_uni_is_white_space(c) && !db_uni_is_letter(c) && !db_uni_is_number(c);
}

/* The length of the regex match at t[i], or 0 where none starts. */
static size_t pretoken_at(const db_text *t, size_t i)
{
    static const char *const contractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
    uint32_t c = t->c[i];
    size_t k;
    if (c == '<' && ((k = match_lit(t, i, SOT)) || (k = match_lit(t, i, EOT))))
        return k;
    if (c == '\'')
        for (size_t a = 0; a < sizeof contractions / sizeof contractions[0]; a++)
            if ((k = match_lit(t, i, contractions[a])))
                return k;
    if (db_uni_is_letter(c)) {
        k = i + 1;
        while (k < t->n && db_uni_is_letter(t->c[k]))
            k++;
        return k - i;
    }
    if (db_uni_is_number(c))
        return 1;
    if (other_char(c)) {
        k = i + 1;
        while (k < t->n && other_char(t->c[k]))
            k++;
        return k - i;
    }
    return 0;
}

/* One piece of the prompt between special tokens: clean-up, pre-tokenizer, BPE. */
static int tokenize_piece(const db_tokenizer *tok, const char *s, size_t len, idvec *out, db_err *err)
{
    db_text t = {0};
    size_t bad;
    unsigned char *word = NULL;
    int rc = -1;
    if (db_utf8_decode(&t, s, len, &bad)) {
        oom(err, "tokenizer");
        goto out;
    }
    if (db_ftfy_fix_text(&t, err) || db_clip_clean_lower(&t, err))
        goto out;
    if (!(word = malloc(t.n * 4 + 1))) {
        oom(err, "tokenizer");
        goto out;
    }
    for (size_t i = 0; i < t.n;) {
        size_t k = pretoken_at(&t, i);
        if (!k) {
            i++;
            continue;
        }
        size_t wl = 0;
        for (size_t j = i; j < i + k; j++)
            wl += db_utf8_put((char *)word + wl, t.c[j]);
        if (bpe_word(tok, word, wl, out)) {
            oom(err, "tokenizer");
            goto out;
        }
        i += k;
    }
    rc = 0;
out:
    free(word);
    db_text_free(&t);
    return rc;
}

int db_tokenize_words(const db_tokenizer *tok, const char *text, int32_t **ids, size_t *n, db_err *err)
{
    *ids = NULL;
    *n = 0;
    size_t len = strlen(text);
    db_text check = {0};
    size_t bad;
    if (db_utf8_decode(&check, text, len, &bad)) {
        db_text_free(&check);
        if (errno == ENOMEM)
            return oom(err, "tokenizer");
        return db_err_set(err, DB_EUSAGE, "prompt: invalid UTF-8 at byte %zu", bad);
    }
    db_text_free(&check);

    /* PreTrainedTokenizer.tokenize: special (and added) tokens are cut out
     * of the raw text first -- leftmost, then longest -- and the rest is
     * cleaned and split piece by piece */
    idvec out = {0};
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        const special *hit = NULL;
        size_t hl = 0;
        for (size_t k = 0; i < len && k < tok->nsplit; k++) {
            size_t l = strlen(tok->split[k].text);
            if (l > hl && i + l <= len && !memcmp(text + i, tok->split[k].text, l)) {
                hit = &tok->split[k];
                hl = l;
            }
        }
        if (!hit && i < len)
            continue;
        if (i > start && tokenize_piece(tok, text + start, i - start, &out, err))
            goto fail;
        if (hit) {
            if (idv_push(&out, hit->id)) {
                oom(err, "tokenizer");
                goto fail;
            }
            i += hl - 1;
            start = i + 1;
        }
    }
    *ids = out.v;
    *n = out.n;
    if (!out.n) {
        free(out.v);
        *ids = NULL;
    }
    return 0;
fail:
    free(out.v);
    return -1;
}

int db_tokenize(const db_tokenizer *tok, const char *prompt, int max_len, int32_t *ids, int *n_real, db_err *err)
{
    if (max_len < 2)
        return db_err_set(err, DB_EUSAGE, "tokenize: max_len %d leaves no room for BOS and EOS", max_len);
    int32_t *raw;
    size_t n;
    if (db_tokenize_words(tok, prompt, &raw, &n, err))
        return -1;
    /* truncation=True: the prompt's ids are cut to max_len - 2, so EOS stays */
    size_t keep = n < (size_t)max_len - 2 ? n : (size_t)max_len - 2;
    ids[0] = tok->bos;
    if (keep)
        memcpy(ids + 1, raw, keep * sizeof *ids);
    ids[keep + 1] = tok->eos;
    for (size_t i = keep + 2; i < (size_t)max_len; i++)
        ids[i] = tok->pad;
    if (n_real)
        *n_real = (int)keep + 2;
    free(raw);
    return 0;
}
