#include "cortex/log.h"

#include <fcntl.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <ctime>
#include <mutex>

namespace cortex {
namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
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

void LogLine(LogLevel level, const std::string& msg) {
  struct timeval tv;
  gettimeofday(&tv, nullptr);
  struct tm tm;
  localtime_r(&tv.tv_sec, &tm);
  char ts[32];
  std::strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
  // Messages carry names that anyone chose (plugin files, task text): control characters
  // are written as \xNN, and a message of several lines continues on indented lines, so
  // no message can pass for a line of its own or drive the terminal that shows the log.
  std::string text;
  text.reserve(msg.size());
  for (unsigned char c : msg) {
    if (c == '\n') {
      text += "\n  ";
    } else if (c < 0x20 || c == 0x7f) {
      char esc[8];
      std::snprintf(esc, sizeof esc, "\\x%02x", c);
      text += esc;
    } else {
      text += static_cast<char>(c);
    }
  }
  char prefix[96];
  std::snprintf(prefix, sizeof prefix, "%s.%03ld cortexd[%d] %s: ", ts,
                static_cast<long>(tv.tv_usec / 1000), static_cast<int>(getpid()), Name(level));
  std::string line;
  for (size_t at = 0;;) {  // every line with the prefix, so each can be told apart
    size_t nl = text.find('\n', at);
    line += prefix + text.substr(at, nl == std::string::npos ? std::string::npos : nl - at) + "\n";
    if (nl == std::string::npos) break;
    at = nl + 1;
  }
  std::lock_guard<std::mutex> lock(g_mu);
  FILE* out = g_out ? g_out : stderr;
  std::fputs(line.c_str(), out);
  std::fflush(out);
}

}  // namespace cortex
