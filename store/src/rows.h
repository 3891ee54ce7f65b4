// What both store backends write and read the same way: tags and candidates as JSON, the
// report's bucketing and latency edges, the poison guard's message. Internal to the store.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cortex/types.h"

namespace cortex::store {

nlohmann::json TagsJson(const Tags& tags);
Tags ParseTags(const std::string& text);
nlohmann::json CandidatesJson(const Decision& d);
// The candidates of a stored decision (entries that are not objects are skipped).
std::vector<Candidate> ParseCandidates(const nlohmann::json& a);
// Each candidate (expert, rule score, recorded model score and prior) into o->candidates,
// and the prior recorded for o->expert into o->prior.
void ReadLoggedCandidates(const nlohmann::json& a, LoggedOutcome* o);
// Whether an attempt that ended so is training data (not interrupted, not a crash: a crash
// is a health signal), and the reward it earned before any verdict.
bool IsTrainingOutcome(OutcomeKind k);
bool IsTrainingOutcome(const std::string& kind);
double OutcomeReward(const Outcome& o);
// Why a verdict was refused by training.feedback_per_hour.
std::string FeedbackBoundMessage(const std::string& by, int per_hour);

// Why Recover failed a task instead of retrying it.
std::string PoisonError();

// The report's latency histogram edges: 1, 2, 5 x 10^k seconds from a millisecond to an hour.
const std::vector<double>& LatencyEdges();
// The report's window and buckets, once `since`, `until` and the task count are known: sets
// since, until, bucket_s and sizes every per-bucket series; returns the bucket count.
size_t SizeReport(const ReportQuery& q, double since, double until, ReportData* out);
// The latency histogram's query: (bin, count) of finished tasks created at or after the
// first parameter and ended by the second, written `since` and `until` ("?1"/"$1"...).
std::string LatencySql(const std::string& since, const std::string& until);
// The reliability diagram, one row of (expert, confidence bin, decisions, mean confidence,
// success rate, summed squared error) at a time; Finish adds each expert's to `out`.
class CalibrationRows {
 public:
  void Add(const std::string& expert, long bin, long n, double confidence, double success,
           double squared_error);
  void Finish(ReportData* out);

 private:
  std::map<std::string, ReportData::Calibration> by_;
};
// The bucket of a row (clamped: `until` itself falls in the last one).
inline size_t Bucket(const ReportData& r, long b) {
  const long n = static_cast<long>(r.decided.size());
  return static_cast<size_t>(b < 0 ? 0 : b >= n ? n - 1 : b);
}

}  // namespace cortex::store
