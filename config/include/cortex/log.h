// Minimal leveled logging to stderr (or a file once the daemon detaches). Thread-safe.
#pragma once

#include <fmt/format.h>

#include <string>

namespace cortex {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

void SetLogLevel(LogLevel level);
// Redirects log output to `path` (appending). Returns false if it cannot be opened.
bool SetLogFile(const std::string& path);
void LogLine(LogLevel level, const std::string& msg);
bool LogEnabled(LogLevel level);

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
void LogDebug(fmt::format_string<Args...> f, Args&&... a) {
  if (LogEnabled(LogLevel::kDebug))
    LogLine(LogLevel::kDebug, fmt::format(f, std::forward<Args>(a)...));
}

}  // namespace cortex
