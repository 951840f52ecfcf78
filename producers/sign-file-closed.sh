#!/bin/sh
# Sign a file-closed message for rucio-injector, for a DAQ not written in Python (see README "Signed events").
# The signature is the hex HMAC-SHA256 of exactly the body bytes you send, keyed with the key file's text.
#
#   usage: sign-file-closed.sh KEY_ID KEY_FILE < body.json
#   prints the two headers to send with that body:  injector-key-id: ...  /  injector-signature: ...
#
# openssl takes the key on its command line, where other users of this host can see it (ps): run this on a DAQ host
# no one else logs in to, or compute the same HMAC with your language's crypto library.
set -eu
key_id=$1
key=$(cat "$2")  # the key's text; a trailing newline is not part of it
sig=$(openssl dgst -sha256 -hmac "$key" | sed 's/^.*= //')
printf 'injector-key-id: %s\ninjector-signature: %s\n' "$key_id" "$sig"
