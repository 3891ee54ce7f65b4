#include "cortex/store_url.h"

#include <algorithm>
#include <cctype>
#include <vector>

namespace cortex {

namespace {

void ReplaceAll(std::string* s, const std::string& what, const std::string& with) {
  if (what.empty()) return;
  for (size_t p = s->find(what); p != std::string::npos; p = s->find(what, p + with.size()))
    s->replace(p, what.size(), with);
}

// Percent-decoded, as far as it decodes ("50%of" stays as written where it does not).
std::string Decoded(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && std::isxdigit(static_cast<unsigned char>(s[i + 1])) &&
        std::isxdigit(static_cast<unsigned char>(s[i + 2]))) {
      out += static_cast<char>(std::stoi(s.substr(i + 1, 2), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

// Every password `url` may carry: the authority's (user:PASSWORD@, up to the last '@'
// before the path, so a '@' or '/' inside it still counts) and password= parameters.
std::vector<std::string> Passwords(const std::string& url) {
  std::vector<std::string> out;
  const size_t scheme = url.find("://");
  if (scheme != std::string::npos) {
    const size_t start = scheme + 3;
    const size_t at = url.rfind('@', url.find('?', start));
    if (at != std::string::npos && at >= start) {
      const size_t colon = url.find(':', start);
      if (colon != std::string::npos && colon < at)
        out.push_back(url.substr(colon + 1, at - colon - 1));
    }
  }
  for (size_t p = url.find("password="); p != std::string::npos; p = url.find("password=", p + 1)) {
    const size_t v = p + 9;
    const size_t e = url.find_first_of("& ", v);
    out.push_back(url.substr(v, (e == std::string::npos ? url.size() : e) - v));
  }
  return out;
}

}  // namespace

std::string RedactUrl(const std::string& url) {
  std::string out = url;
  const size_t scheme = out.find("://");
  if (scheme != std::string::npos) {
    const size_t start = scheme + 3;
    const size_t end = out.find_first_of("/?", start);
    const size_t at = out.rfind('@', end == std::string::npos ? std::string::npos : end);
    if (at != std::string::npos && at >= start) {
      const size_t colon = out.find(':', start);
      if (colon != std::string::npos && colon < at) out.replace(colon + 1, at - colon - 1, "***");
    }
  }
  for (size_t p = out.find("password="); p != std::string::npos; p = out.find("password=", p + 1)) {
    const size_t v = p + 9;
    const size_t e = out.find_first_of("& ", v);
    out.replace(v, (e == std::string::npos ? out.size() : e) - v, "***");
  }
  // A password the shape above misses (a '/' or '?' in it) is masked wherever it is.
  for (const auto& p : Passwords(url)) ReplaceAll(&out, p, "***");
  return out;
}

std::string RedactMessage(const std::string& text, const std::string& url) {
  std::string out = text;
  ReplaceAll(&out, url, RedactUrl(url));
  std::vector<std::string> secrets;
  for (const auto& p : Passwords(url)) {
    secrets.push_back(p);
    secrets.push_back(Decoded(p));
  }
  // Longest first, so a password that contains another is masked whole.
  std::sort(secrets.begin(), secrets.end(),
            [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  for (const auto& s : secrets) ReplaceAll(&out, s, "***");
  return out;
}

bool IsPostgresUrl(const std::string& s) {
  return s.rfind("postgresql://", 0) == 0 || s.rfind("postgres://", 0) == 0;
}

}  // namespace cortex
