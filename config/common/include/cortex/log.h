// Minimal leveled logging to stderr (or a file once the daemon detaches). Thread-safe.
#pragma once

#include <fmt/format.h>

#include <string>

namespace cortex {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

void SetLogLevel(LogLevel level);
// How long LogRepeating holds a message back after writing it (60 s). Tests shorten it.
void SetLogRepeatWindow(double seconds);
// Redirects log output to `path` (appending). Returns false if it cannot be opened.
bool SetLogFile(const std::string& path);
// One record: `msg` is shown through Printable, so a newline in it is `\n`, not a line.
void LogLine(LogLevel level, const std::string& msg);
// A message that is several lines on purpose (every config error, a line each): a record
// per line, the later ones indented under the first.
void LogLines(LogLevel level, const std::string& msg);
bool LogEnabled(LogLevel level);
// For what a retry loop may say every second (a heartbeat or a read failing while the
// database is down): written once, then held back for the window, and the next line past
// it says how often it came since. Everything else is always written (a state change, a
// reload refused twice).
void LogRepeating(LogLevel level, const std::string& msg);

// Text that anyone chose (task text, tags, file names, expert output, plugin messages)
// made safe to show on a terminal or in a log: an escape sequence could recolour, retitle
// or rewrite the screen, a newline could forge a line that looks like one of ours. Control
// characters become \n, \t and \xNN; C1 controls and the invisible characters that
// reorder or hide text (bidi overrides and isolates, direction marks, zero-width and line
// separators, BOM) become \uXXXX. `keep_lines` keeps \n and \t, for multi-line output
// that the caller indents line by line.
std::string Printable(const std::string& s, bool keep_lines = false);

template <typename... Args>
void LogInfo(fmt::format_string<Args...> f, Args&&... a) {
  if (LogEnabled(LogLevel::kInfo))
    LogLine(LogLevel::kInfo, fmt::format(f, std::forward<Args>(a)...));
}
template <typename... Args>
void LogWarn(fmt::format_string<Args...> f, Args&&... a) {
  if (LogEnabled(LogLevel::kWarn))
    LogLine(LogLevel::kWarn, fmt::format(f, std::forward<Args>(a)...));
}
template <typename... Args>
void LogError(fmt::format_string<Args...> f, Args&&... a) {
  LogLine(LogLevel::kError, fmt::format(f, std::forward<Args>(a)...));
}
template <typename... Args>
void LogWarnRepeating(fmt::format_string<Args...> f, Args&&... a) {
  if (LogEnabled(LogLevel::kWarn))
    LogRepeating(LogLevel::kWarn, fmt::format(f, std::forward<Args>(a)...));
}
template <typename... Args>
void LogErrorRepeating(fmt::format_string<Args...> f, Args&&... a) {
  LogRepeating(LogLevel::kError, fmt::format(f, std::forward<Args>(a)...));
}
template <typename... Args>
void LogDebug(fmt::format_string<Args...> f, Args&&... a) {
  if (LogEnabled(LogLevel::kDebug))
    LogLine(LogLevel::kDebug, fmt::format(f, std::forward<Args>(a)...));
}

}  // namespace cortex
