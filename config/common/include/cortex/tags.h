// The rules for a task's tag keys, shared by cortexd (which enforces them) and cortexctl
// (which reports a breach as a usage error before sending).
#pragma once

#include <cctype>
#include <string>

namespace cortex {

// 1-64 characters of letters, digits, '_', '.' and '-'.
inline bool ValidTagKey(const std::string& k) {
  if (k.empty() || k.size() > 64) return false;
  for (unsigned char c : k)
    if (!std::isalnum(c) && c != '_' && c != '.' && c != '-') return false;
  return true;
}

// The name under which an expert sees a tag (the command expert: CORTEX_TAG_<name>): keys
// are matched regardless of case and of '.', '-' versus '_'. Two keys of one task must
// differ in this name, or an expert could not tell them apart.
inline std::string TagKeyName(const std::string& k) {
  std::string out;
  for (unsigned char c : k)
    out.push_back(std::isalnum(c) ? static_cast<char>(std::toupper(c)) : '_');
  return out;
}

}  // namespace cortex
