// store.url: a PostgreSQL database named by a libpq connection URI.
#pragma once

#include <string>

namespace cortex {

// Whether `s` names a PostgreSQL database (a postgresql:// or postgres:// URI).
bool IsPostgresUrl(const std::string& s);
// `url` as it may be shown or logged: its password (in the authority or a password=
// parameter) replaced by ***.
std::string RedactUrl(const std::string& url);
// `text` (a message from libpq, which may quote the URL or a token of it) with `url`'s
// password masked wherever it appears, as written or percent-decoded, and `url` itself
// shown redacted: whatever libpq says, no message carries the password.
std::string RedactMessage(const std::string& text, const std::string& url);

}  // namespace cortex
