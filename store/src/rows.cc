#include "rows.h"

#include <algorithm>
#include <cmath>

#include "cortex/store.h"

namespace cortex::store {

using json = nlohmann::json;

json TagsJson(const Tags& tags) {
  json a = json::array();
  for (const auto& [k, v] : tags) a.push_back({k, v});
  return a;
}

Tags ParseTags(const std::string& text) {
  Tags tags;
  json j = json::parse(text, nullptr, false);
  if (j.is_array())
    for (const auto& kv : j)
      if (kv.is_array() && kv.size() == 2 && kv[0].is_string() && kv[1].is_string())
        tags.emplace_back(kv[0], kv[1]);
  return tags;
}

json CandidatesJson(const Decision& d) {
  json a = json::array();
  for (const auto& c : d.candidates)
    a.push_back({{"expert", c.expert},
                 {"rule_score", c.rule_score},
                 {"model_score", c.model_score},
                 {"load_bias", c.load_bias},
                 {"health_bias", c.health_bias},
                 {"score", c.score},
                 {"confidence", c.confidence},
                 {"rules", c.rules},
                 {"prior", c.prior}});
  return a;
}

std::vector<Candidate> ParseCandidates(const json& a) {
  std::vector<Candidate> out;
  if (!a.is_array()) return out;
  for (const auto& c : a) {
    if (!c.is_object()) continue;
    Candidate x;
    x.expert = c.value("expert", "");
    x.rule_score = c.value("rule_score", 0.0);
    x.model_score = c.value("model_score", 0.0);
    x.load_bias = c.value("load_bias", 0.0);
    x.health_bias = c.value("health_bias", 0.0);
    x.score = c.value("score", 0.0);
    x.confidence = c.value("confidence", 0.0);
    x.rules = c.value("rules", std::vector<std::string>{});
    x.prior = c.value("prior", 0.0);
    out.push_back(std::move(x));
  }
  return out;
}

void ReadLoggedCandidates(const json& a, LoggedOutcome* o) {
  o->candidates.clear();
  o->prior = 0;
  if (!a.is_array()) return;
  for (const auto& c : a) {
    if (!c.is_object()) continue;
    LoggedCandidate x{c.value("expert", ""), c.value("rule_score", 0.0),
                      c.value("model_score", 0.0), c.value("prior", 0.0)};
    if (x.expert == o->expert) o->prior = x.prior;
    o->candidates.push_back(std::move(x));
  }
}

bool IsTrainingOutcome(OutcomeKind k) {
  return k != OutcomeKind::kInterrupted && k != OutcomeKind::kCrash;
}

bool IsTrainingOutcome(const std::string& kind) {
  auto k = ParseOutcomeKind(kind);
  return k && IsTrainingOutcome(*k);
}

double OutcomeReward(const Outcome& o) { return o.kind == OutcomeKind::kSuccess ? o.quality : 0.0; }

std::string FeedbackBoundMessage(const std::string& by, int per_hour) {
  // The count given may exceed the bound (it can be lowered by a reload): say the bound.
  return (by.empty() ? std::string("this user") : by) + " reached the limit of " +
         std::to_string(per_hour) +
         " verdicts in the last hour (training.feedback_per_hour); try again later";
}

std::string PoisonError() {
  return "cortexd crashed " + std::to_string(Store::kPoisonDeaths) +
         " times while routing or running this task; it is not retried (poison-task guard)";
}

const std::vector<double>& LatencyEdges() {
  static const std::vector<double> edges = [] {
    std::vector<double> e;
    for (int k = -3; k <= 3; ++k)
      for (double m : {1.0, 2.0, 5.0})
        if (m * std::pow(10.0, k) < 3600) e.push_back(m * std::pow(10.0, k));
    e.push_back(3600);
    return e;
  }();
  return edges;
}

std::string LatencySql(const std::string& since, const std::string& until) {
  const std::vector<double>& edges = LatencyEdges();
  std::string c = "CASE";
  for (size_t i = 0; i < edges.size(); ++i)
    c += " WHEN updated_at-created_at<=" + std::to_string(edges[i]) + " THEN " + std::to_string(i);
  return "SELECT " + c + " ELSE " + std::to_string(edges.size()) +
         " END,count(*) FROM tasks WHERE created_at>=" + since + " AND updated_at<=" + until +
         " AND state IN ('succeeded','failed','cancelled','interrupted') GROUP BY 1";
}

void CalibrationRows::Add(const std::string& expert, long bin, long n, double confidence,
                          double success, double squared_error) {
  ReportData::Calibration& c = by_[expert];
  if (c.bin_n.empty()) {
    c.expert = expert;
    c.bin_n.assign(10, 0);
    c.bin_confidence.assign(10, 0);
    c.bin_success.assign(10, 0);
  }
  const size_t k = static_cast<size_t>(std::clamp<long>(bin, 0, 9));
  c.bin_n[k] = n;
  c.bin_confidence[k] = confidence;
  c.bin_success[k] = success;
  c.n += n;
  c.brier += squared_error;
}

void CalibrationRows::Finish(ReportData* out) {
  for (auto& [name, c] : by_) {
    c.brier /= std::max<long>(c.n, 1);
    out->calibration.push_back(std::move(c));
  }
  by_.clear();
}

size_t SizeReport(const ReportQuery& q, double since, double until, ReportData* out) {
  // A small log gets fewer buckets, so that a rate per bucket means something.
  const long most = std::max(1, q.buckets);
  const long least = std::min<long>({10, most, std::max<long>(1, out->tasks)});
  const long nb = q.tasks_per_bucket > 0
                      ? std::clamp<long>(out->tasks / q.tasks_per_bucket, least, most)
                      : most;
  out->since = since;
  out->until = until;
  out->bucket_s = std::max((until - since) / static_cast<double>(nb), 1e-3);
  const size_t n = static_cast<size_t>(nb);
  out->decided.assign(n, 0);
  out->first_done.assign(n, 0);
  out->first_ok.assign(n, 0);
  out->model_version.assign(n, -1);
  out->finished.assign(n, 0);
  out->succeeded.assign(n, 0);
  out->latency_mean.assign(n, 0);
  out->latency_max.assign(n, 0);
  out->latency_edges = LatencyEdges();
  out->latency_counts.assign(out->latency_edges.size() + 1, 0);
  return n;
}

}  // namespace cortex::store
