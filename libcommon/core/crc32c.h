/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as used by the .dbt
 * trailer and TFRecord framing.  crc = db_crc32c(0, buf, n) for one buffer;
 * pass the previous value to continue: db_crc32c(crc, more, m). */
#ifndef DB_CRC32C_H
#define DB_CRC32C_H

#include <stddef.h>
#include <stdint.h>

uint32_t db_crc32c(uint32_t crc, const void *buf, size_t n);

#endif
