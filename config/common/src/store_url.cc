#include "cortex/store_url.h"

#include <algorithm>
#include <cctype>
#include <utility>
#include <vector>

namespace cortex {

namespace {

void ReplaceAll(std::string* s, const std::string& what, const std::string& with) {
  if (what.empty()) return;
  for (size_t p = s->find(what); p != std::string::npos; p = s->find(what, p + with.size()))
    s->replace(p, what.size(), with);
}

// A secret as `ReplaceAll` masks it; one of two characters only where it stands alone
// (not inside a word: "ss" of "p@ss" must not turn "password" into "pa***word").
void Mask(std::string* s, const std::string& secret) {
  if (secret.size() > 2) return ReplaceAll(s, secret, "***");
  auto word = [&](size_t i) {
    return i < s->size() && std::isalnum(static_cast<unsigned char>((*s)[i]));
  };
  for (size_t p = s->find(secret); p != std::string::npos; p = s->find(secret, p + 1))
    if (!(p > 0 && word(p - 1)) && !word(p + secret.size())) s->replace(p, secret.size(), "***");
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

// Where the authority starts: past the scheme and whatever run of ':' and '/' follows
// it, so a mistyped "postgresql:/u:pw@h" is read as a URL too.
size_t AuthorityStart(const std::string& url) {
  size_t i = 0;
  while (i < url.size() && (std::isalnum(static_cast<unsigned char>(url[i])) || url[i] == '+' ||
                            url[i] == '-' || url[i] == '.'))
    ++i;
  if (i == url.size() || (url[i] != ':' && url[i] != '/')) return 0;
  while (i < url.size() && (url[i] == ':' || url[i] == '/')) ++i;
  return i;
}

// The password's place in the authority (user:PASSWORD@): up to the last '@' anywhere,
// since libpq and a reader may split a '@', '/' or '?' inside it differently.
bool AuthorityPassword(const std::string& url, size_t* from, size_t* len) {
  const size_t start = AuthorityStart(url);
  const size_t at = url.rfind('@');
  if (at == std::string::npos || at < start) return false;
  const size_t colon = url.find(':', start);
  if (colon == std::string::npos || colon >= at) return false;
  *from = colon + 1;
  *len = at - colon - 1;
  return true;
}

// Each password= parameter's value: every '?'- or '&'-separated piece whose key decodes
// to "password" (libpq decodes keys too: "%70assword").
std::vector<std::pair<size_t, size_t>> ParamPasswords(const std::string& url) {
  std::vector<std::pair<size_t, size_t>> out;
  for (size_t b = url.find_first_of("?&"); b != std::string::npos;
       b = url.find_first_of("?&", b + 1)) {
    const size_t eq = url.find('=', b + 1);
    const size_t end = std::min(url.find('&', b + 1), url.size());
    if (eq == std::string::npos || eq > end) continue;
    std::string key = Decoded(url.substr(b + 1, eq - b - 1));
    std::transform(key.begin(), key.end(), key.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    key.erase(0, key.find_first_not_of(" \t"));
    key.erase(key.find_last_not_of(" \t") + 1);
    if (key == "password") out.push_back({eq + 1, end - eq - 1});
  }
  return out;
}

// Everything of `url`'s passwords that a message might quote: each whole, as written and
// percent-decoded, and its pieces between the characters a parser may cut at (libpq
// reading "pw@rt@host" as host "rt@host", or "pw/rt" as a port), longest first.
std::vector<std::string> Secrets(const std::string& url) {
  std::vector<std::string> whole;
  size_t from, len;
  if (AuthorityPassword(url, &from, &len)) whole.push_back(url.substr(from, len));
  for (const auto& [f, l] : ParamPasswords(url)) whole.push_back(url.substr(f, l));
  std::vector<std::string> out;
  for (const std::string& w : whole)
    for (const std::string& p : {w, Decoded(w)}) {
      if (p.size() >= 2) out.push_back(p);
      for (size_t b = 0, e; b < p.size(); b = e + 1) {
        e = std::min(p.find_first_of("@/?#&=:; \t", b), p.size());
        if (e - b >= 2) out.push_back(p.substr(b, e - b));
      }
    }
  std::sort(out.begin(), out.end(),
            [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  return out;
}

}  // namespace

std::string RedactUrl(const std::string& url) {
  // The places first (any length), right to left so earlier offsets stay put; then any
  // piece of a password still showing.
  std::vector<std::pair<size_t, size_t>> places = ParamPasswords(url);
  size_t from, len;
  if (AuthorityPassword(url, &from, &len)) places.push_back({from, len});
  std::sort(places.begin(), places.end());
  std::string out = url;
  size_t limit = out.size();
  for (auto it = places.rbegin(); it != places.rend(); ++it) {
    if (it->first + it->second > limit) continue;  // overlaps one masked already
    out.replace(it->first, it->second, "***");
    limit = it->first;
  }
  for (const auto& s : Secrets(url)) Mask(&out, s);
  return out;
}

std::string RedactMessage(const std::string& text, const std::string& url) {
  std::string out = text;
  ReplaceAll(&out, url, RedactUrl(url));
  for (const auto& s : Secrets(url)) Mask(&out, s);
  return out;
}

bool IsPostgresUrl(const std::string& s) {
  return s.rfind("postgresql://", 0) == 0 || s.rfind("postgres://", 0) == 0;
}

}  // namespace cortex
