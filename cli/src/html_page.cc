#include "cortex/html_page.h"

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

}  // namespace cortex::html
