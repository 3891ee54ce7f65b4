// Self-contained HTML pages with plots (`cortexctl report --html`, `cortex-bench replay
// --html`): Chart.js and the data are inline and a Content-Security-Policy forbids every
// request, so a page opens from disk, offline, and shows the same thing in a year.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "cortex/status.h"

namespace cortex::html {

enum class Page { kReport, kReplay };

// The whole page: `title`, then the page's own script drawing `data` (read by the script
// as window.__cortexData). Each script records how many points every plot drew in
// window.__cortexPlots and sets window.__cortexReady once done (the browser test reads
// both).
std::string ChartPage(Page page, const std::string& title, const nlohmann::json& data);

// Writes `page` to `path` whole or not at all: into a new file beside it (never one that
// is there already, such as a link planted in a shared folder), then renamed over it. A
// file it replaces keeps its permissions; a new one gets those the umask allows.
Status WritePage(const std::string& path, const std::string& page);

}  // namespace cortex::html
