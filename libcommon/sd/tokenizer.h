/* The CLIP BPE tokenizer exactly as SD1.x uses it: transformers'
 * CLIPTokenizer (the slow one) with ftfy installed, called as
 *
 *   tokenizer(prompt, padding="max_length", max_length=77, truncation=True)
 *
 * Steps, each as transformers does them:
 *   1. split the prompt on the special tokens' text ("<|startoftext|>",
 *      "<|endoftext|>", and the pad/unk tokens); those pieces become their ids
 *   2. every other piece: ftfy.fix_text, \s+ -> ' ', strip, str.lower()
 *      (libcommon/sd/textfix.h)
 *   3. the pre-tokenizer regex
 *        <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|
 *        [\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+            (IGNORECASE)
 *   4. each word's UTF-8 bytes through GPT-2's bytes_to_unicode table, the
 *      last symbol marked "</w>", byte-level BPE by merge rank; unknown
 *      pieces map to the unk token
 *   5. BOS + ids (truncated to max_len - 2) + EOS, padded with the pad token.
 *
 * transformers (unlike openai/CLIP's SimpleTokenizer) does not run
 * html.unescape after ftfy; we follow transformers.  Prompts must be valid
 * UTF-8 (transformers takes a Python str, which cannot hold anything else):
 * invalid bytes are refused with an error giving their offset.
 *
 * Vocabulary: vocab.json + merges.txt (+ special_tokens_map.json or
 * tokenizer_config.json for the special tokens, when present) of a model's
 * tokenizer/ folder, or the copy shipped in data/clip/sd-tokenizer/.
 *
 * A loaded tokenizer is read-only but for a BPE cache behind a mutex, so one
 * tokenizer may serve several threads. */
#ifndef DB_TOKENIZER_H
#define DB_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "../core/err.h"

#define DB_CLIP_MAX_LENGTH 77 /* SD1.x text encoder positions */

typedef struct db_tokenizer db_tokenizer;

typedef struct db_tokenizer_info {
    int32_t bos, eos, pad, unk; /* 49406, 49407, 49407, 49407 for SD1.x */
    size_t vocab_size;          /* entries of vocab.json (49408) */
    size_t n_merges;            /* merge rules in use (48894) */
} db_tokenizer_info;

/* Load vocab.json + merges.txt from dir.  Malformed files are refused with
 * an error naming the file (and line for merges.txt). */
int db_tokenizer_load(db_tokenizer **out, const char *dir, db_err *err);
/* The model's tokenizer folder when model_dir is not NULL (db_model's
 * tokenizer_dir), else the CLIP vocabulary shipped with the tools,
 * data_dir/clip/sd-tokenizer, where data_dir is db_data_dir()'s answer. */
int db_tokenizer_load_default(db_tokenizer **out, const char *model_dir, const char *data_dir, db_err *err);
void db_tokenizer_free(db_tokenizer *tok);
void db_tokenizer_get_info(const db_tokenizer *tok, db_tokenizer_info *info);

/* ids[0..max_len): BOS, the prompt's ids (at most max_len - 2 of them), EOS,
 * then pad.  *n_real (may be NULL) gets the count before padding (BOS and
 * EOS included), so ids[*n_real - 1] is the EOS.  max_len >= 2. */
int db_tokenize(const db_tokenizer *tok, const char *prompt, int max_len, int32_t *ids, int *n_real,
                db_err *err);

/* The raw ids of text, without BOS/EOS, truncation or padding (what
 * transformers' tokenizer(text, add_special_tokens=False) returns), for
 * callers that assemble sequences themselves (prompt weighting, chunking).
 * *ids is malloc'd (NULL when *n is 0); the caller frees it. */
int db_tokenize_words(const db_tokenizer *tok, const char *text, int32_t **ids, size_t *n, db_err *err);

/* Vocabulary lookups: the id of a token string as written in vocab.json
 * ("sks</w>" for the word "sks"), or -1; the token string of an id, or NULL. */
int32_t db_tokenizer_id(const db_tokenizer *tok, const char *token);
const char *db_tokenizer_token(const db_tokenizer *tok, int32_t id);

#endif
