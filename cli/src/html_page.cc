#include "cortex/html_page.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace cortex::embedded {
extern const char kChartJs[];   // Debian's libjs-chart.js, chart.min.js
extern const char kCommonJs[];  // pages/common.js
extern const char kReportJs[];  // pages/report.js
extern const char kReplayJs[];  // pages/replay.js
extern const char kPageCss[];   // pages/page.css
}  // namespace cortex::embedded

namespace cortex::html {

namespace {

std::string Escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// JSON inside a <script> element: '<' appears only inside strings, where \u003c means
// the same, so no "</script>" or "<!--" in the data can end the element early.
std::string ScriptJson(const nlohmann::json& data) {
  const std::string j = data.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  std::string out;
  out.reserve(j.size());
  for (char c : j) out += c == '<' ? std::string("\\u003c") : std::string(1, c);
  return out;
}

}  // namespace

std::string ChartPage(Page page, const std::string& title, const nlohmann::json& data) {
  std::string h;
  h += "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n";
  // Nothing may be fetched: the page is whole as written.
  h += "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
       "script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:\">\n";
  h += "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n";
  h += "<title>" + Escape(title) + "</title>\n<style>\n";
  h += embedded::kPageCss;
  h += "</style>\n</head>\n<body>\n<header><h1>" + Escape(title) +
       "</h1><p id=\"summary\"></p></header>\n<main id=\"plots\"></main>\n";
  h += "<footer>Written by Cortex. Plots drawn with Chart.js 3.9.1 (MIT licence, &copy; "
       "Chart.js contributors), embedded in this page.</footer>\n";
  h += "<script type=\"application/json\" id=\"cortex-data\">" + ScriptJson(data) +
       "</script>\n<script>\n";
  h += embedded::kChartJs;
  h += "\n</script>\n<script>\n";
  h += embedded::kCommonJs;
  h += "\n</script>\n<script>\n";
  h += page == Page::kReport ? embedded::kReportJs : embedded::kReplayJs;
  h += "\n</script>\n</body>\n</html>\n";
  return h;
}

Status WritePage(const std::string& path, const std::string& page) {
  std::string tmp = path + ".XXXXXX";
  const int fd = mkstemp(tmp.data());
  if (fd < 0) return Status::IOError("cannot write " + path + ": " + std::strerror(errno));
  mode_t mode;
  if (struct stat st{}; ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
    mode = st.st_mode & 07777;
  } else {
    const mode_t mask = umask(0);
    umask(mask);
    mode = 0666 & ~mask;  // (mkstemp made it 0600)
  }
  bool ok = fchmod(fd, mode) == 0;
  for (size_t at = 0; ok && at < page.size();) {
    const ssize_t n = ::write(fd, page.data() + at, page.size() - at);
    if (n < 0 && errno == EINTR) continue;
    ok = n > 0;
    if (ok) at += static_cast<size_t>(n);
  }
  ok = ::close(fd) == 0 && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    ::unlink(tmp.c_str());
    return Status::IOError("cannot write " + path + ": " + why);
  }
  return Status::OK();
}

}  // namespace cortex::html
