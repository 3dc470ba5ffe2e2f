#include "json.h"

#include "../core/fsutil.h"

json_t *db_json_load_object(const char *path, db_err *err)
{
    json_error_t je;
    json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!j) {
        if (!db_exists(path))
            db_err_set(err, DB_EIO, "%s: missing", path);
        else
            db_err_set(err, DB_EFORMAT, "%s: invalid JSON: %s (line %d)", path, je.text, je.line);
        return NULL;
    }
    if (!json_is_object(j)) {
        json_decref(j);
        db_err_set(err, DB_EFORMAT, "%s: not a JSON object", path);
        return NULL;
    }
    return j;
}

const char *db_json_type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "a list";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}
