#include "fsutil.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

char *db_path_join(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    char *p = malloc(la + lb + 2);
    if (!p)
        return NULL;
    memcpy(p, a, la);
    size_t o = la;
    if (la && a[la - 1] != '/')
        p[o++] = '/';
    memcpy(p + o, b, lb + 1);
    return p;
}

static char *tmp_name_beside(const char *path)
{
    char *d1 = strdup(path), *b1 = strdup(path);
    char *res = NULL;
    if (d1 && b1) {
        const char *dir = dirname(d1), *base = basename(b1);
        size_t n = strlen(dir) + strlen(base) + 32;
        res = malloc(n);
        if (res)
            snprintf(res, n, "%s/.%s.tmp-XXXXXX", dir, base);
    }
    free(d1);
    free(b1);
    return res;
}

int db_outfile_open(db_outfile *o, const char *path, db_err *err)
{
    memset(o, 0, sizeof *o);
    o->final_path = strdup(path);
    o->tmp_path = tmp_name_beside(path);
    if (!o->final_path || !o->tmp_path)
        return db_err_set(err, DB_ENOMEM, "%s: out of memory", path);
    int fd = mkstemp(o->tmp_path);
    if (fd < 0) {
        db_err_errno(err, path);
        free(o->tmp_path);
        o->tmp_path = NULL;
        return -1;
    }
    fchmod(fd, 0644);
    o->f = fdopen(fd, "wb");
    if (!o->f) {
        close(fd);
        db_outfile_abort(o);
        return db_err_errno(err, path);
    }
    return 0;
}

int db_outdir_open(db_outfile *o, const char *path, db_err *err)
{
    memset(o, 0, sizeof *o);
    if (db_exists(path))
        return db_err_set(err, DB_EIO, "%s: already exists (refusing to overwrite)", path);
    o->is_dir = 1;
    o->final_path = strdup(path);
    o->tmp_path = tmp_name_beside(path);
    if (!o->final_path || !o->tmp_path)
        return db_err_set(err, DB_ENOMEM, "%s: out of memory", path);
    if (!mkdtemp(o->tmp_path)) {
        db_err_errno(err, path);
        free(o->tmp_path);
        o->tmp_path = NULL;
        return -1;
    }
    chmod(o->tmp_path, 0755);
    return 0;
}

int db_fsync_path(const char *path, int is_dir, db_err *err)
{
    int fd = open(path, (is_dir ? O_DIRECTORY : 0) | O_RDONLY);
    if (fd < 0)
        return db_err_errno(err, path);
    int rc = fsync(fd);
    close(fd);
    /* some filesystems refuse fsync on directories; that is not data loss */
    if (rc && !(is_dir && (errno == EINVAL || errno == EBADF)))
        return db_err_errno(err, path);
    return 0;
}

static int fsync_tree(const char *path, db_err *err)
{
    DIR *d = opendir(path);
    if (!d)
        return db_err_errno(err, path);
    struct dirent *e;
    int rc = 0;
    while (!rc && (e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        char *p = db_path_join(path, e->d_name);
        if (!p) {
            rc = db_err_set(err, DB_ENOMEM, "out of memory");
            break;
        }
        rc = db_is_dir(p) ? fsync_tree(p, err) : db_fsync_path(p, 0, err);
        free(p);
    }
    closedir(d);
    return rc ? rc : db_fsync_path(path, 1, err);
}

int db_outfile_commit(db_outfile *o, db_err *err)
{
    if (!o->tmp_path)
        return db_err_set(err, DB_EUSAGE, "commit of an output that is not open");
    if (o->f) {
        FILE *f = o->f;
        o->f = NULL;
        int bad = fflush(f) != 0 || ferror(f);
        if (!bad && fsync(fileno(f)))
            bad = 1;
        if (fclose(f))
            bad = 1;
        if (bad) {
            db_err_errno(err, o->final_path);
            db_outfile_abort(o);
            return -1;
        }
    } else if (o->is_dir && fsync_tree(o->tmp_path, err)) {
        db_outfile_abort(o);
        return -1;
    }
    if (o->is_dir && db_exists(o->final_path)) {
        db_err_set(err, DB_EIO, "%s: appeared while writing (refusing to overwrite)", o->final_path);
        db_outfile_abort(o);
        return -1;
    }
    if (rename(o->tmp_path, o->final_path)) {
        db_err_errno(err, o->final_path);
        db_outfile_abort(o);
        return -1;
    }
    char *d = strdup(o->final_path);
    if (d) {
        db_fsync_path(dirname(d), 1, NULL);
        free(d);
    }
    free(o->tmp_path);
    free(o->final_path);
    o->tmp_path = o->final_path = NULL;
    return 0;
}

void db_outfile_abort(db_outfile *o)
{
    if (o->f) {
        fclose(o->f);
        o->f = NULL;
    }
    if (o->tmp_path) {
        if (o->is_dir)
            db_rm_rf(o->tmp_path);
        else
            unlink(o->tmp_path);
    }
    free(o->tmp_path);
    free(o->final_path);
    o->tmp_path = o->final_path = NULL;
}

int db_write_all(int fd, const void *buf, size_t n, db_err *err)
{
    const char *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n > (1u << 30) ? (1u << 30) : n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return db_err_errno(err, "write");
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int db_read_file(const char *path, size_t max, char **out, size_t *len, db_err *err)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return db_err_errno(err, path);
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        if (n == cap) {
            if (cap >= max) {
                free(buf);
                fclose(f);
                return db_err_set(err, DB_EFORMAT, "%s: larger than %zu bytes", path, max);
            }
            cap = cap * 2 > max ? max : cap * 2;
            char *nb = realloc(buf, cap + 1);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0)
            break;
    }
    int bad = !buf || ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        return buf ? db_err_errno(err, path) : db_err_set(err, DB_ENOMEM, "%s: out of memory", path);
    }
    buf[n] = 0;
    *out = buf;
    if (len)
        *len = n;
    return 0;
}

int db_is_dir(const char *path)
{
    struct stat st;
    return !stat(path, &st) && S_ISDIR(st.st_mode);
}

int db_exists(const char *path)
{
    struct stat st;
    return !lstat(path, &st);
}

void db_rm_rf(const char *path)
{
    DIR *d = opendir(path);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                continue;
            char *p = db_path_join(path, e->d_name);
            if (!p)
                continue;
            struct stat st;
            if (!lstat(p, &st) && S_ISDIR(st.st_mode))
                db_rm_rf(p);
            else
                unlink(p);
            free(p);
        }
        closedir(d);
        rmdir(path);
    } else {
        unlink(path);
    }
}
