#include "cortex/log.h"

#include <fcntl.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cortex/status.h"

namespace cortex {
namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::atomic<long> g_window_ms{60000};  // SetLogRepeatWindow
std::mutex g_mu;
FILE* g_out = nullptr;  // nullptr means stderr
const char* Name(LogLevel l) {
  switch (l) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarn:
      return "warn";
    case LogLevel::kError:
      return "error";
  }
  return "?";
}
}  // namespace

void SetLogRepeatWindow(double seconds) { g_window_ms = static_cast<long>(seconds * 1000); }
void SetLogLevel(LogLevel level) { g_level = static_cast<int>(level); }
bool LogEnabled(LogLevel level) { return static_cast<int>(level) >= g_level.load(); }

bool SetLogFile(const std::string& path) {
  // Never through a symlink: the log may sit in a folder others can reach.
  int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return false;
  FILE* f = ::fdopen(fd, "a");
  if (!f) {
    ::close(fd);
    return false;
  }
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_out) std::fclose(g_out);
  g_out = f;
  return true;
}

namespace {
// The length of the well-formed UTF-8 sequence at s[i] (a lead byte of 0x80 or more),
// 0 if there is none (a stray continuation byte, a cut or overlong sequence, a surrogate).
size_t Utf8At(const std::string& s, size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  size_t n;
  unsigned char lo = 0x80, hi = 0xbf;
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    if (c == 0xe0) lo = 0xa0;
    if (c == 0xed) hi = 0x9f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    if (c == 0xf0) lo = 0x90;
    if (c == 0xf4) hi = 0x8f;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    const unsigned char b = static_cast<unsigned char>(s[i + k]);
    if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xbf)) return 0;
  }
  return n;
}
}  // namespace

std::string Printable(const std::string& s, bool keep_lines) {
  std::string out;
  out.reserve(s.size());
  char esc[16];
  for (size_t i = 0; i < s.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const unsigned char c1 = i + 1 < s.size() ? static_cast<unsigned char>(s[i + 1]) : 0;
    const unsigned char c2 = i + 2 < s.size() ? static_cast<unsigned char>(s[i + 2]) : 0;
    if ((c == '\n' || c == '\t') && keep_lines) {
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      std::snprintf(esc, sizeof esc, "\\x%02x", c);
      out += esc;
    } else if (c == 0xc2 && c1 >= 0x80 && c1 <= 0x9f) {  // C1 controls
      std::snprintf(esc, sizeof esc, "\\u%04x", c1);
      out += esc;
      ++i;
    } else if (c == 0xd8 && c1 == 0x9c) {  // U+061C arabic letter mark
      out += "\\u061c";
      ++i;
    } else if (c == 0xe2 && ((c1 == 0x80 && ((c2 >= 0x8b && c2 <= 0x8f) ||    // U+200B-200F
                                             (c2 >= 0xa8 && c2 <= 0xae))) ||  // U+2028-202E
                             (c1 == 0x81 && c2 >= 0xa6 && c2 <= 0xa9))) {     // U+2066-2069
      std::snprintf(esc, sizeof esc, "\\u%04x",
                    ((c & 0x0f) << 12) | ((c1 & 0x3f) << 6) | (c2 & 0x3f));
      out += esc;
      i += 2;
    } else if (c == 0xef && c1 == 0xbb && c2 == 0xbf) {  // U+FEFF zero width no-break space
      out += "\\ufeff";
      i += 2;
    } else if (const size_t n = c < 0x80 ? 1 : Utf8At(s, i); n == 0) {
      // Not UTF-8: a raw 0x85 or 0x9b is a C1 control (NEL, CSI) to a terminal.
      std::snprintf(esc, sizeof esc, "\\x%02x", c);
      out += esc;
    } else {
      out.append(s, i, n);
      i += n - 1;
    }
  }
  return out;
}

namespace {
// What a retry loop logs (LogRepeating): by hash of the text, when it was last written and
// how often it came since. Leaked: a detached thread may still log during exit.
struct Seen {
  std::chrono::steady_clock::time_point at;
  std::string wall;  // when it was last written, HH:MM:SS
  long more = 0;
};
auto& g_seen = *new std::unordered_map<size_t, Seen>;  // under g_mu

// Whether `text` is written now; `suffix` gets how often it was held back since.
bool Due(const std::string& text, const char* wall, std::string* suffix) {
  const auto now = std::chrono::steady_clock::now();
  const size_t key = std::hash<std::string>()(text);
  auto it = g_seen.find(key);
  const auto window = std::chrono::milliseconds(g_window_ms.load());
  if (it != g_seen.end() && now - it->second.at < window) {
    ++it->second.more;
    return false;
  }
  if (it != g_seen.end() && it->second.more > 0)
    *suffix = fmt::format(" (and {} more time{} since {})", it->second.more,
                          it->second.more == 1 ? "" : "s", it->second.wall);
  if (g_seen.size() >= 1024)  // bounded: old entries go first, all of them if need be
    for (auto i = g_seen.begin(); i != g_seen.end();)
      i = now - i->second.at >= window ? g_seen.erase(i) : std::next(i);
  if (g_seen.size() >= 1024) g_seen.clear();
  g_seen[key] = {now, wall, 0};
  return true;
}

void Write(LogLevel level, const std::vector<std::string>& lines, bool repeating = false) {
  struct timeval tv;
  gettimeofday(&tv, nullptr);
  struct tm tm;
  localtime_r(&tv.tv_sec, &tm);
  char ts[32];
  std::strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
  char prefix[96];
  std::snprintf(prefix, sizeof prefix, "%s.%03ld cortexd[%d] %s: ", ts,
                static_cast<long>(tv.tv_usec / 1000), static_cast<int>(getpid()), Name(level));
  std::string text;
  for (size_t i = 0; i < lines.size(); ++i)
    text += prefix + std::string(i ? "  " : "") + Printable(lines[i]) + "\n";
  std::lock_guard<std::mutex> lock(g_mu);
  if (repeating) {
    std::string since;
    if (!Due(lines.front(), ts + 11, &since)) return;
    text.insert(text.size() - 1, since);
  }
  FILE* out = g_out ? g_out : stderr;
  std::fputs(text.c_str(), out);
  std::fflush(out);
}
}  // namespace

void LogRepeating(LogLevel level, const std::string& msg) {
  if (LogEnabled(level)) Write(level, {msg}, true);
}

void LogLine(LogLevel level, const std::string& msg) { Write(level, {msg}); }

void LogLines(LogLevel level, const std::string& msg) {
  if (LogEnabled(level)) Write(level, SplitLines(msg));
}

}  // namespace cortex
