/* Output files and directories that appear under their final name only when
 * complete: write to a hidden temporary beside the target, fsync, rename,
 * fsync the directory.  Abort (or a crash) leaves the final name untouched. */
#ifndef DB_FSUTIL_H
#define DB_FSUTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "err.h"

typedef struct db_outfile {
    char *final_path;
    char *tmp_path;
    FILE *f;
    int is_dir;
} db_outfile;

/* Open a temporary file beside `path`. */
int db_outfile_open(db_outfile *o, const char *path, db_err *err);
/* Create a temporary directory beside `path`; files go under o->tmp_path.
 * Fails if `path` already exists. */
int db_outdir_open(db_outfile *o, const char *path, db_err *err);
/* fsync + rename into place (for a file: flush and close first). */
int db_outfile_commit(db_outfile *o, db_err *err);
/* Remove the temporary (file or directory tree); safe to call twice. */
void db_outfile_abort(db_outfile *o);

int db_write_all(int fd, const void *buf, size_t n, db_err *err);
int db_fsync_path(const char *path, int is_dir, db_err *err);
/* Read a whole (small) file into a NUL-terminated malloc'd buffer. */
int db_read_file(const char *path, size_t max, char **out, size_t *len, db_err *err);
int db_is_dir(const char *path);
int db_exists(const char *path);
/* path join into a malloc'd string */
char *db_path_join(const char *a, const char *b);
/* Recursively remove a directory tree (best effort). */
void db_rm_rf(const char *path);

#endif
