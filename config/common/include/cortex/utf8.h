// UTF-8 checks shared by the wire protocol (requests must be UTF-8) and the stores (a
// PostgreSQL text column takes nothing else).
#pragma once

#include <cstddef>
#include <string>

namespace cortex {

// Byte offset of the first invalid UTF-8 sequence, or npos when `s` is valid.
size_t InvalidUtf8At(const std::string& s);
// `s` with every byte that breaks UTF-8 replaced by '?'.
std::string ValidUtf8(std::string s);

}  // namespace cortex
