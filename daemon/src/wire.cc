#include "cortex/wire.h"

#include <map>
#include <optional>

#include <cmath>
#include <ctime>

#include "cortex/learner.h"

namespace cortex::wire {

std::string IsoTime(double t) {
  if (t <= 0) return "";
  time_t secs = static_cast<time_t>(t);
  int ms = static_cast<int>(std::lround((t - static_cast<double>(secs)) * 1000));
  if (ms >= 1000) secs += 1, ms -= 1000;
  struct tm tm;
  gmtime_r(&secs, &tm);
  char buf[40];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
  char out[64];
  std::snprintf(out, sizeof out, "%s.%03dZ", buf, ms);
  return out;
}

// `score` is the final score the router ranks by (SPEC): rule and model scores plus the
// load and health biases; `base_score` leaves the biases out.
json ToJson(const Candidate& c) {
  return {{"expert", c.expert},
          {"rule_score", c.rule_score},
          {"model_score", c.model_score},
          {"load_bias", c.load_bias},
          {"health_bias", c.health_bias},
          {"base_score", c.score},
          {"score", c.score + c.load_bias + c.health_bias},
          {"confidence", c.confidence},
          {"rules", c.rules},
          {"prior", c.prior}};
}

json ToJson(const Decision& d) {
  json cands = json::array();
  for (const auto& c : d.candidates) cands.push_back(ToJson(c));
  return {{"time", IsoTime(d.time)},
          {"model_version", d.model_version},
          {"model_step", d.model_step >= 0 ? json(d.model_step) : json(nullptr)},
          {"model_activation", d.model_step >= 0 ? json(d.model_live) : json(nullptr)},
          {"chosen", d.chosen},
          {"propensity", d.propensity},
          {"explored", d.explored},
          {"forced", d.forced},
          {"candidates", cands}};
}

json ToJson(const ModelRecord& m) {
  json metrics = json::parse(m.metrics, nullptr, false);
  return {
      {"version", m.version},
      {"name", Learner::VersionName(m.version)},
      {"created", IsoTime(m.created)},
      {"created_unix", m.created},
      {"status", m.status},
      {"live", m.live},
      {"trained_through", m.trained_through},
      {"weights_bytes", m.weights_bytes ? m.weights_bytes : static_cast<long>(m.weights.size())},
      {"metrics", metrics.is_discarded() ? json::object() : metrics}};
}

json ToJson(const ReportData& r) {
  json start = json::array();
  for (size_t b = 0; b < r.decided.size(); ++b) start.push_back(r.since + b * r.bucket_s);
  auto named = [](const std::vector<std::pair<std::string, std::vector<long>>>& series) {
    json o = json::object();
    for (const auto& [name, v] : series) o[name] = v;
    return o;
  };
  json cal = json::array();
  for (const auto& c : r.calibration) {
    json bins = json::array();
    for (size_t k = 0; k < c.bin_n.size(); ++k)
      bins.push_back(
          {{"n", c.bin_n[k]}, {"confidence", c.bin_confidence[k]}, {"success", c.bin_success[k]}});
    cal.push_back({{"expert", c.expert}, {"n", c.n}, {"brier", c.brier}, {"bins", bins}});
  }
  json events = json::array(), rules = json::array(), models = json::array();
  for (const auto& e : r.recent_events) events.push_back(ToJson(e));
  for (const auto& [rule, n] : r.rules) rules.push_back({{"rule", rule}, {"decisions", n}});
  for (const auto& m : r.models) models.push_back(ToJson(m));
  return {{"since", r.since},
          {"until", r.until},
          {"since_iso", IsoTime(r.since)},
          {"until_iso", IsoTime(r.until)},
          {"bucket_s", r.bucket_s},
          {"tasks", r.tasks},
          {"buckets",
           {{"start", start},
            {"decided", r.decided},
            {"first_done", r.first_done},
            {"first_ok", r.first_ok},
            {"model_version", r.model_version},
            {"finished", r.finished},
            {"succeeded", r.succeeded},
            {"latency_mean_s", r.latency_mean},
            {"latency_max_s", r.latency_max}}},
          {"share", named(r.share)},
          {"calibration", cal},
          {"latency", {{"edges_s", r.latency_edges}, {"counts", r.latency_counts}}},
          {"events", named(r.events)},
          {"recent_events", events},
          {"rules", rules},
          {"models", models}};
}

std::optional<double> FeedbackQuality(const Task& t) {
  // Each person's latest verdict on the last attempt (or, before schema 4, on the task).
  const int last = t.attempts.empty() ? 0 : t.attempts.back().n;
  std::map<std::string, double> latest;
  for (const auto& f : t.feedback)
    if (f.attempt == 0 || f.attempt == last) latest[f.by] = f.quality;
  if (latest.empty()) return std::nullopt;
  double sum = 0;
  for (const auto& [by, q] : latest) sum += q;
  return sum / static_cast<double>(latest.size());
}

json FinalOutcome(const Task& t) {
  if (!IsFinal(t.state) || t.attempts.empty() || !t.attempts.back().outcome) return nullptr;
  const Outcome& o = *t.attempts.back().outcome;
  double q = FeedbackQuality(t).value_or(o.quality);
  return {
      {"kind", ToString(o.kind)}, {"quality", q}, {"duration_s", o.duration_s}, {"error", o.error}};
}

namespace {
// `expert` and `confidence` always belong together: the expert whose attempt ended the
// task (the chosen one until then) and the router's confidence in it. `chosen` and
// `chosen_confidence` are the first pick, which differs after a fallback.
void PutExpert(const Task& t, json* j) {
  const Decision* d = t.decision ? &*t.decision : nullptr;
  const std::string& expert = !t.expert.empty() ? t.expert : d ? d->chosen : t.expert;
  const Candidate* c = d ? d->Find(expert) : nullptr;
  const Candidate* first = d ? d->Find(d->chosen) : nullptr;
  (*j)["expert"] = expert.empty() ? json(nullptr) : json(expert);
  (*j)["confidence"] = c ? json(c->confidence) : json(nullptr);
  (*j)["chosen"] = d ? json(d->chosen) : json(nullptr);
  (*j)["chosen_confidence"] = first ? json(first->confidence) : json(nullptr);
}
}  // namespace

json ToJson(const Task& t) {
  json tags = json::object();
  for (const auto& [k, v] : t.tags) tags[k] = v;
  json attempts = json::array();
  for (const auto& a : t.attempts) {
    json o = nullptr;
    if (a.outcome)
      o = {{"kind", ToString(a.outcome->kind)},
           {"quality", a.outcome->quality},
           {"duration_s", a.outcome->duration_s},
           {"error", a.outcome->error},
           {"output", a.outcome->output}};
    attempts.push_back({{"n", a.n},
                        {"expert", a.expert},
                        {"started_at", IsoTime(a.started_at)},
                        {"finished_at", IsoTime(a.finished_at)},
                        {"outcome", o}});
  }
  json fb = json::array();
  for (const auto& f : t.feedback)
    fb.push_back({{"time", IsoTime(f.time)},
                  {"quality", f.quality},
                  {"note", f.note},
                  {"by", f.by},
                  {"attempt", f.attempt}});
  json j = {{"id", t.id},
            {"text", t.text},
            {"tags", tags},
            {"state", ToString(t.state)},
            {"created_at", IsoTime(t.created_at)},
            {"updated_at", IsoTime(t.updated_at)},
            {"decision", t.decision ? ToJson(*t.decision) : json(nullptr)},
            {"attempts", attempts},
            {"feedback", fb},
            {"outcome", FinalOutcome(t)}};
  if (!t.error.empty()) j["error"] = t.error;
  PutExpert(t, &j);
  return j;
}

json ToJson(const HistoryRow& r) {
  return {{"id", r.id},
          {"seq", r.seq},
          {"time", IsoTime(r.time)},
          {"text", r.text},
          {"state", r.state},
          {"expert", r.expert},
          {"confidence", r.confidence},
          {"chosen", r.chosen},
          {"chosen_confidence", r.chosen_confidence},
          {"outcome", r.outcome.empty() ? json(nullptr) : json(r.outcome)},
          {"quality", r.quality < 0 ? json(nullptr) : json(r.quality)},
          {"explored", r.explored}};
}

json ToJson(const ExpertEvent& e) {
  return {{"time", IsoTime(e.time)},
          {"expert", e.expert},
          {"file", e.file},
          {"event", e.event},
          {"detail", e.detail}};
}

json ExportRow(const Task& t) {
  json j = {{"id", t.id},
            {"time", IsoTime(t.created_at)},
            {"text", t.text},
            {"state", ToString(t.state)}};
  json tags = json::object();
  for (const auto& [k, v] : t.tags) tags[k] = v;
  j["tags"] = tags;
  PutExpert(t, &j);
  if (t.decision) {
    j["model_version"] = t.decision->model_version;
    j["model_step"] = t.decision->model_step >= 0 ? json(t.decision->model_step) : json(nullptr);
    j["propensity"] = t.decision->propensity;
    j["explored"] = t.decision->explored;
    json cands = json::array();
    for (const auto& x : t.decision->candidates) cands.push_back(ToJson(x));
    j["candidates"] = cands;
  }
  j["attempts"] = t.attempts.size();
  j["outcome"] = FinalOutcome(t);
  const std::optional<double> fq = FeedbackQuality(t);
  j["feedback_quality"] = fq ? json(*fq) : json(nullptr);
  return j;
}

json Error(const Status& s) {
  // Messages may quote request bytes (a JSON parser's "last read: ..."): keep them UTF-8.
  return {{"ok", false}, {"error", {{"code", s.code_name()}, {"message", ValidUtf8(s.message())}}}};
}

std::string Line(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

json Ok(json result) { return {{"ok", true}, {"result", std::move(result)}}; }

}  // namespace cortex::wire
