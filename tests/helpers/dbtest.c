/* dbtest: exposes library internals to the shell tests (git's test-tool idea).
 *   dbtest crc32c FILE           print crc32c of a file
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libcommon/core/crc32c.h"
#include "libcommon/core/fsutil.h"

int main(int argc, char **argv)
{
    if (argc >= 3 && !strcmp(argv[1], "crc32c")) {
        char *buf;
        size_t n;
        db_err e = {0};
        if (db_read_file(argv[2], (size_t)1 << 32, &buf, &n, &e)) {
            fprintf(stderr, "dbtest: %s\n", e.msg);
            return 1;
        }
        printf("%08x\n", db_crc32c(0, buf, n));
        free(buf);
        return 0;
    }
    fprintf(stderr, "usage: dbtest crc32c FILE\n");
    return 2;
}
