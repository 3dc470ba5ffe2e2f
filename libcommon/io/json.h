/* Small jansson helpers shared by the config readers. */
#ifndef DB_JSON_H
#define DB_JSON_H

#include <jansson.h>

#include "../core/err.h"

/* A JSON object from a file (duplicate keys refused); NULL with err naming
 * the file (missing, invalid JSON with line, or not an object). */
json_t *db_json_load_object(const char *path, db_err *err);
/* "an object", "a list", "a string", ... for messages. */
const char *db_json_type_name(const json_t *v);

#endif
