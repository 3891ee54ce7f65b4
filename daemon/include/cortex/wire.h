// The JSON shapes of the wire protocol (SPEC.md "JSON field names"), one place for all.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "cortex/experts.h"
#include "cortex/types.h"
#include "cortex/utf8.h"

namespace cortex::wire {

using json = nlohmann::json;

std::string IsoTime(double unix_seconds);
json ToJson(const Candidate& c);
json ToJson(const Decision& d);
json ToJson(const Task& t);        // show, submit --wait
json ToJson(const HistoryRow& r);  // history
json ToJson(const ExpertEvent& e);
json ToJson(const ModelRecord& m);  // models, retrain: metrics parsed, weights left out
json ToJson(const ReportData& r);   // report: the aggregates its page plots
json ExportRow(const Task& t);      // export: one decision with its outcome
json Error(const Status& s);
json Ok(json result);

// The outcome that counts for a finished task: its last attempt, quality overridden by
// the verdicts on it (the mean of each person's latest).
json FinalOutcome(const Task& t);
std::optional<double> FeedbackQuality(const Task& t);

using cortex::InvalidUtf8At;  // (cortex/utf8.h)
using cortex::ValidUtf8;
// One response line: serialising never throws (invalid UTF-8 becomes U+FFFD).
std::string Line(const json& j);

}  // namespace cortex::wire
