/* Table-driven option parsing shared by every tool.
 *
 * A tool describes its options once; the same table parses argv, generates
 * --help and records which options were given.  Syntax (one from day one):
 *   --name VALUE, --name=VALUE, -x VALUE, --flag, and `--` ends options.
 * Options and positional arguments may be mixed (GNU style).
 */
#ifndef DB_CLI_H
#define DB_CLI_H

#include <stdint.h>

#include "err.h"

typedef enum { DB_OPT_FLAG, DB_OPT_STR, DB_OPT_INT, DB_OPT_FLOAT } db_opt_type;

typedef struct db_opt {
    const char *name;    /* long name without dashes: "dtype" */
    char short_name;     /* 0 for none */
    db_opt_type type;
    const char *metavar; /* "fp32|fp16|bf16"; NULL for flags */
    const char *help;    /* one line; the default is appended when def is set */
    void *dest;          /* int* (flag), const char** (str), int64_t* (int), double* (float) */
    const char *def;     /* default shown in --help (the caller initialises *dest) */
    int given;           /* set by the parser: times the option appeared */
} db_opt;

typedef struct db_cli {
    const char *prog;     /* "db-ckpt info" */
    const char *usage;    /* "[options] MODEL" */
    const char *summary;  /* one paragraph shown under the usage line */
    db_opt *opts;         /* terminated by an entry with name == NULL */
    const char *epilog;   /* extra text after the options, may be NULL */
} db_cli;

enum { DB_CLI_OK = 0, DB_CLI_EXIT = 1, DB_CLI_USAGE = -1 };

/* Parse argv[1..argc).  Positional arguments are moved, in order, to
 * pos[0..*npos) (pos must have room for argc entries).  --help prints help to
 * stdout and --version prints version_text; both return DB_CLI_EXIT.  A usage
 * error returns DB_CLI_USAGE with the reason in err. */
int db_cli_parse(db_cli *cli, int argc, char **argv, char **pos, int *npos, const char *version_text,
                 db_err *err);
void db_cli_help(const db_cli *cli, void *stream /* FILE* */);
/* What every tool's main does with its table: parse; --help / --version
 * (version text computed only when asked) give 0; a usage error is printed
 * as "prog: error: reason (see 'prog --help')" and gives 2; otherwise -1:
 * carry on. */
struct db_log;
int db_cli_main(db_cli *cli, int argc, char **argv, char **pos, int *npos, const struct db_log *lg);
/* Was option `name` given on the command line? */
int db_cli_given(const db_cli *cli, const char *name);

#endif
