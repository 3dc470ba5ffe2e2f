#!/bin/sh
# Regenerate the image fixtures in this folder (they are committed; tests do
# not run this).  Needs libvips-dev and zlib.
set -e
cd "$(dirname "$0")"
cc -std=c11 -O1 -o /tmp/make_fixtures.$$ make_fixtures.c $(pkg-config --cflags --libs vips) -lz
/tmp/make_fixtures.$$
rm -f /tmp/make_fixtures.$$
