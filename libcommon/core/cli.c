#include "cli.h"

#include "log.h"
#include "version.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static db_opt *find_long(db_cli *cli, const char *name, size_t len)
{
    for (db_opt *o = cli->opts; o && o->name; o++)
        if (strlen(o->name) == len && !strncmp(o->name, name, len))
            return o;
    return NULL;
}

static db_opt *find_short(db_cli *cli, char c)
{
    for (db_opt *o = cli->opts; o && o->name; o++)
        if (o->short_name == c)
            return o;
    return NULL;
}

static int set_value(db_opt *o, const char *val, db_err *err)
{
    char *end;
    switch (o->type) {
    case DB_OPT_FLAG:
        *(int *)o->dest = 1;
        return 0;
    case DB_OPT_STR:
        *(const char **)o->dest = val;
        return 0;
    case DB_OPT_INT: {
        errno = 0;
        long long v = strtoll(val, &end, 0);
        if (errno || end == val || *end)
            return db_err_set(err, DB_EUSAGE, "--%s: '%s' is not an integer", o->name, val);
        *(int64_t *)o->dest = v;
        return 0;
    }
    case DB_OPT_FLOAT: {
        errno = 0;
        double v = strtod(val, &end);
        if (errno || end == val || *end || !isfinite(v))
            return db_err_set(err, DB_EUSAGE, "--%s: '%s' is not a number", o->name, val);
        *(double *)o->dest = v;
        return 0;
    }
    }
    return db_err_set(err, DB_EUSAGE, "--%s: bad option table", o->name);
}

int db_cli_parse(db_cli *cli, int argc, char **argv, char **pos, int *npos, const char *version_text,
                 db_err *err)
{
    *npos = 0;
    int only_pos = 0;
    for (int i = 1; i < argc; i++) {
        char *a = argv[i];
        if (only_pos || a[0] != '-' || !strcmp(a, "-")) {
            pos[(*npos)++] = a;
            continue;
        }
        if (!strcmp(a, "--")) {
            only_pos = 1;
            continue;
        }
        db_opt *o;
        const char *inline_val = NULL;
        if (a[1] == '-') {
            const char *name = a + 2, *eq = strchr(name, '=');
            size_t len = eq ? (size_t)(eq - name) : strlen(name);
            if (len == 4 && !strncmp(name, "help", 4)) {
                db_cli_help(cli, stdout);
                return DB_CLI_EXIT;
            }
            if (len == 7 && !strncmp(name, "version", 7)) {
                fputs(version_text ? version_text : "", stdout);
                return DB_CLI_EXIT;
            }
            o = find_long(cli, name, len);
            if (!o) {
                db_err_set(err, DB_EUSAGE, "unknown option '--%.*s'", (int)len, name);
                return DB_CLI_USAGE;
            }
            if (eq)
                inline_val = eq + 1;
        } else {
            if (a[1] == 'h' && !a[2]) {
                db_cli_help(cli, stdout);
                return DB_CLI_EXIT;
            }
            o = find_short(cli, a[1]);
            if (!o) {
                db_err_set(err, DB_EUSAGE, "unknown option '%s'", a);
                return DB_CLI_USAGE;
            }
            if (a[2])
                inline_val = a + 2;
        }
        const char *val = NULL;
        if (o->type == DB_OPT_FLAG) {
            if (inline_val) {
                db_err_set(err, DB_EUSAGE, "option '--%s' takes no value", o->name);
                return DB_CLI_USAGE;
            }
        } else if (inline_val) {
            val = inline_val;
        } else if (i + 1 < argc) {
            val = argv[++i];
        } else {
            db_err_set(err, DB_EUSAGE, "option '--%s' needs a value (%s)", o->name,
                       o->metavar ? o->metavar : "VALUE");
            return DB_CLI_USAGE;
        }
        if (set_value(o, val, err))
            return DB_CLI_USAGE;
        o->given++;
    }
    return DB_CLI_OK;
}

void db_cli_help(const db_cli *cli, void *stream)
{
    FILE *f = stream;
    fprintf(f, "usage: %s %s\n", cli->prog, cli->usage ? cli->usage : "[options]");
    if (cli->summary)
        fprintf(f, "\n%s\n", cli->summary);
    fprintf(f, "\noptions:\n");
    for (const db_opt *o = cli->opts; o && o->name; o++) {
        char left[96];
        int n = snprintf(left, sizeof left, "  %s%c%s--%s%s%s", o->short_name ? "-" : "",
                         o->short_name ? o->short_name : ' ', o->short_name ? ", " : "  ", o->name,
                         o->metavar ? " " : "", o->metavar ? o->metavar : "");
        if (n < 30)
            fprintf(f, "%-30s %s", left, o->help ? o->help : "");
        else
            fprintf(f, "%s\n%-30s %s", left, "", o->help ? o->help : "");
        if (o->def)
            fprintf(f, " (default: %s)", o->def);
        fputc('\n', f);
    }
    fprintf(f, "  -h, --help                   show this help and exit\n");
    fprintf(f, "      --version                show version and build features, then exit\n");
    if (cli->epilog)
        fprintf(f, "\n%s\n", cli->epilog);
}

int db_cli_given(const db_cli *cli, const char *name)
{
    for (const db_opt *o = cli->opts; o && o->name; o++)
        if (!strcmp(o->name, name))
            return o->given;
    return 0;
}

int db_cli_main(db_cli *cli, int argc, char **argv, char **pos, int *npos, const db_log *lg)
{
    char prog[64], ver[1024];
    db_err e = {0};
    /* "db-ckpt info" -> "db-ckpt" for the version line */
    snprintf(prog, sizeof prog, "%.*s", (int)strcspn(cli->prog, " "), cli->prog);
    int rc = db_cli_parse(cli, argc, argv, pos, npos, db_version_if_asked(argc, argv, prog, ver, sizeof ver), &e);
    if (rc == DB_CLI_EXIT)
        return 0;
    if (rc == DB_CLI_USAGE) {
        db_error(lg, "%s (see '%s --help')", e.msg, cli->prog);
        return 2;
    }
    return -1;
}
