#include "trainer.h"

#include <malloc.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>

#include <fmt/format.h>

#include "cortex/log.h"
#include "cortex/wire.h"
#include "metrics.h"

namespace cortex {

using json = nlohmann::json;

Trainer::Trainer(Store* store, std::shared_ptr<Learner> learner, Env* env,
                 std::function<void(const std::string&, const std::string&)> event,
                 const std::atomic<bool>* stop, double interval_s, long min_new_outcomes,
                 Metrics* metrics)
    : store_(store),
      learner_(std::move(learner)),
      env_(env),
      event_(std::move(event)),
      metrics_(metrics),
      stop_(stop),
      schedule_(interval_s, min_new_outcomes),
      interval_s_(interval_s),
      min_new_(min_new_outcomes) {}

Trainer::~Trainer() { Stop(); }

void Trainer::Start() {
  newest_seq_ = learner_->trained_through();
  thread_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "trainer");
    // Learning trails the pipeline under load: the trainer runs at the lowest priority
    // (nice 19), on what CPU the tasks leave, and catches up on every outcome the store
    // logged meanwhile, in batches. Routing waits for it only while a step writes the
    // live model's weights (Learner's model lock, taken exclusive for each update alone):
    // preempted anywhere else, it holds nothing routing needs. (Not SCHED_IDLE: it would
    // starve while holding even that.)
    setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), 19);
    Loop();
  });
}

void Trainer::Stop() {
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Trainer::SetCluster(std::function<std::string()> trainer,
                         std::function<void(int)> live_changed) {
  not_trainer_ = std::move(trainer);
  live_changed_ = std::move(live_changed);
}

void Trainer::ReloadLive() {
  reload_ = true;
  Wake();
}

void Trainer::Wake() {
  if (woken_.exchange(true)) return;   // already told, not yet looked
  std::lock_guard<std::mutex> l(mu_);  // so the loop is either before its check or waiting
  cv_.notify_all();
}

void Trainer::SetSchedule(double interval_s, long min_new_outcomes) {
  std::lock_guard<std::mutex> l(mu_);
  schedule_ = RetrainSchedule(interval_s, min_new_outcomes);
  interval_s_ = interval_s;
  min_new_ = min_new_outcomes;
}

json Trainer::Status_() {
  std::lock_guard<std::mutex> l(mu_);
  return {{"new_outcomes", new_outcomes_},
          {"interval_s", interval_s_},
          {"min_new_outcomes", min_new_},
          {"in_progress", retraining_ ? json(retrain_log_.back()) : json(nullptr)},
          {"last_retrain", last_retrain_}};
}

std::vector<LoggedOutcome> Trainer::OutcomesAfter(long seq, size_t most) {
  std::vector<LoggedOutcome> out;
  Status st = store_->ForEachOutcome(seq, [&](const LoggedOutcome& o) {
    out.push_back(o);
    return out.size() < most;
  });
  if (!st.ok()) LogErrorRepeating("reading outcomes: {}", st.ToString());
  return out;
}

Status Trainer::LoadLiveModel() {
  // The outcomes logged after the model was trained, to take the online steps again;
  // without online updates there is nothing to take (a large log would only cost the
  // start its reading).
  const bool online = learner_->options().online_updates;
  auto newer = [&](long seq) { return online ? OutcomesAfter(seq) : std::vector<LoggedOutcome>(); };
  std::vector<ModelRecord> models;
  CORTEX_RETURN_IF_ERROR(store_->ListModels(&models));
  for (const auto& m : models) {
    if (!m.live) continue;
    ModelRecord full;
    CORTEX_RETURN_IF_ERROR(store_->LoadModel(m.version, &full));
    auto model = GatingModel::Deserialize(full.weights);
    if (!model.ok()) return model.status().WithContext("live model v" + std::to_string(m.version));
    learner_->Install(std::move(model).value(), m.version, m.trained_through,
                      newer(m.trained_through));
    LogInfo("model v{} is live (trained through outcome {})", m.version, m.trained_through);
    return Status::OK();
  }
  learner_->Install(GatingModel(learner_->options().shape), 0, 0, newer(0));
  return Status::OK();
}

void Trainer::Loop() {
  while (!stop_->load()) {
    bool requested;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait_for(l, std::chrono::seconds(1), [&] {
        return woken_.load() || stop_->load() || retrain_requests_ > requests_served_;
      });
      if (stop_->load()) return;
      requested = retrain_requests_ > requests_served_;
    }
    woken_ = false;                 // a Wake from here on is for outcomes this read may not see
    if (reload_.exchange(false)) {  // another node's model is live: the same here
      if (Status st = LoadLiveModel(); !st.ok())
        LogError("loading the live model: {}", st.message());
    }
    // Online: every outcome logged since the last look, in log order, a bounded batch at
    // a time (after a burst, the next batch follows at once). A rollback's install has
    // replayed those after its model already (they count as new once only); with online
    // updates off the model's own mark stays put, so the loop keeps one of its own.
    constexpr size_t kBatch = 4096;
    std::vector<LoggedOutcome> fresh =
        OutcomesAfter(std::max(learner_->trained_through(), newest_seq_), kBatch);
    if (fresh.size() == kBatch) woken_ = true;
    long added = 0;
    for (const auto& o : fresh) {
      learner_->Observe(o);
      if (o.seq > newest_seq_) ++added, newest_seq_ = o.seq;
    }
    bool due;
    {
      std::lock_guard<std::mutex> l(mu_);
      new_outcomes_ += added;
      due = requested || schedule_.Due(new_outcomes_, env_->NowUnix());
    }
    if (due && not_trainer_ && !requested && !not_trainer_().empty()) {
      // Another node trains: this one's schedule starts over.
      std::lock_guard<std::mutex> l(mu_);
      schedule_.Done(env_->NowUnix());
      new_outcomes_ = 0;
      continue;
    }
    if (due) RunRetrain();
  }
}

void Trainer::RunRetrain() {
  const double now = env_->NowUnix();
  long target;
  {
    std::lock_guard<std::mutex> l(mu_);
    schedule_.Done(now);
    new_outcomes_ = 0;
    target = retrain_requests_;
    retraining_ = true;
    retrain_log_ = {"reading logged outcomes"};
    ++retrain_seq_;
  }
  cv_.notify_all();
  json summary;
  const std::string other = not_trainer_ ? not_trainer_() : "";
  Status st = other.empty() ? RetrainOnce(now, &summary)
                            : Status::FailedPrecondition(
                                  "this node is not the cluster's trainer (" +
                                  (other == "none" ? std::string("no node holds the role right now")
                                                   : "node " + other + " is") +
                                  "); retrain there: cortexctl --socket <its socket> retrain");
  // A retrain reads and featurizes its whole window (tens of MB, freed by now); hand
  // that back to the kernel, or glibc keeps it and cortexd's RSS ratchets upwards. (With
  // jemalloc as malloc this finds nothing to do: jemalloc returns freed pages itself
  // within seconds.)
  malloc_trim(0);
  if (!st.ok()) {
    LogWarn("retrain: {}", st.message());
    summary = {{"error", st.message()}, {"promoted", false}};
  }
  if (metrics_)
    metrics_->Retrained(!st.ok() ? "error" : summary.value("live", false) ? "promoted" : "refused");
  {
    std::lock_guard<std::mutex> l(mu_);
    last_retrain_ = summary;
    retraining_ = false;
    requests_served_ = std::max(requests_served_, target);
  }
  cv_.notify_all();
}

Status Trainer::RetrainOnce(double now, json* summary) {
  // Only the window a retrain uses (training examples plus the holdout), so memory and
  // time stay bounded however long the log grows.
  const LearnerOptions& lo = learner_->options();
  long after = 0;
  CORTEX_RETURN_IF_ERROR(
      store_->OutcomeWindowStart(static_cast<long>(lo.max_examples) + lo.max_holdout, &after));
  std::vector<LoggedOutcome> history = OutcomesAfter(after);
  std::vector<ModelRecord> models;
  CORTEX_RETURN_IF_ERROR(store_->ListModels(&models));
  const int version = models.empty() ? 1 : models.back().version + 1;
  auto res = learner_->Retrain(history, version, now, [this](const std::string& msg) {
    {
      std::lock_guard<std::mutex> l(mu_);
      retrain_log_.push_back(msg);
    }
    cv_.notify_all();
  });
  if (!res.ok()) return res.status();
  // A stop asked for while training ends the retrain here: nothing is saved or promoted.
  if (stop_->load()) return Status::Unavailable("training was cancelled: cortexd is stopping");
  ModelRecord rec = res->record;
  rec.weights = res->model.Serialize();
  rec.live = res->promoted;
  CORTEX_RETURN_IF_ERROR(store_->SaveModel(rec));
  if (res->promoted) {
    learner_->Install(std::move(res->model), version, rec.trained_through,
                      OutcomesAfter(rec.trained_through));
    if (live_changed_) live_changed_(version);
  }
  LogInfo(
      "retrain v{}: {} ({} train, {} held out; candidate {:.3f}, live {:.3f}, diff {:+.3f} "
      "± {:.3f})",
      version, res->promoted ? "promoted" : "refused", res->train_rows, res->holdout_rows,
      res->candidate.value, res->live.value, res->diff.value, res->diff.ci);
  event_("retrain", fmt::format("model v{} {}: {}", version, res->promoted ? "promoted" : "refused",
                                res->reason));
  *summary = wire::ToJson(rec);
  (*summary)["live"] = res->promoted;
  return Status::OK();
}

Status Trainer::Retrain(bool wait, const std::function<bool(const std::string&)>& progress,
                        json* result) {
  long ticket;
  {
    std::lock_guard<std::mutex> l(mu_);
    ticket = ++retrain_requests_;
  }
  cv_.notify_all();
  if (!wait) {
    *result = {{"queued", true}};
    return Status::OK();
  }
  // Every progress line of the retrains that run while we wait, none skipped however
  // fast they come.
  long seq = -1;
  size_t sent = 0;
  std::unique_lock<std::mutex> l(mu_);
  if (!retraining_) seq = retrain_seq_, sent = retrain_log_.size();  // old news
  auto forward = [&]() -> bool {
    if (retrain_seq_ != seq) seq = retrain_seq_, sent = 0;
    while (sent < retrain_log_.size()) {
      std::string line = retrain_log_[sent++];
      l.unlock();
      bool alive = progress(line);
      l.lock();
      if (!alive) return false;
      if (retrain_seq_ != seq) seq = retrain_seq_, sent = 0;
    }
    return true;
  };
  while (requests_served_ < ticket) {
    if (stop_->load())
      return Status::Unavailable("cortexd is stopping; the retrain did not finish");
    if (!forward()) return Status::Unavailable("client went away");
    cv_.wait_for(l, std::chrono::milliseconds(200));
  }
  if (!forward()) return Status::Unavailable("client went away");
  *result = last_retrain_;
  if (result->contains("error"))
    return Status::FailedPrecondition("retrain failed: " + (*result)["error"].get<std::string>());
  return Status::OK();
}

Status Trainer::Models(json* result) {
  std::vector<ModelRecord> models;
  CORTEX_RETURN_IF_ERROR(store_->ListModels(&models));
  json a = json::array();
  bool any_live = false;
  for (const auto& m : models) any_live |= m.live;
  // v0 is the untrained model: the calibrated manifest prior, before any retrain.
  a.push_back({{"version", 0},
               {"name", "v0"},
               {"status", "initial"},
               {"live", !any_live},
               {"metrics", {{"note", "untrained: manifest prior plus online updates"}}}});
  for (const auto& m : models) a.push_back(wire::ToJson(m));
  *result = {{"models", a}, {"live_version", learner_->live_version()}};
  return Status::OK();
}

Status Trainer::Rollback(int version, bool force, json* result) {
  if (version == learner_->live_version()) {  // nothing to do, and no event to record
    *result = {{"live_version", version}, {"previous", version}, {"unchanged", true}};
    return Status::OK();
  }
  GatingModel model(learner_->options().shape);
  long through = 0;
  if (version != 0) {
    ModelRecord rec;
    CORTEX_RETURN_IF_ERROR(store_->LoadModel(version, &rec));
    if (rec.status == "refused" && !force) {
      std::string why;
      try {
        why = json::parse(rec.metrics).value("reason", "");
      } catch (const json::exception&) {
      }
      return Status::FailedPrecondition(
          "model v" + std::to_string(version) + " was refused at validation" +
          (why.empty() ? "" : " (" + why + ")") + "; `cortexctl models rollback " +
          std::to_string(version) + " --force` makes it live anyway");
    }
    auto m = GatingModel::Deserialize(rec.weights);
    if (!m.ok()) return m.status().WithContext("model v" + std::to_string(version));
    model = std::move(m).value();
    through = rec.trained_through;
  }
  const int previous = learner_->live_version();
  CORTEX_RETURN_IF_ERROR(store_->SetLiveModel(version));
  // Outcomes after its cutoff are applied by the trainer thread, the only thread that
  // feeds the learner, so none is skipped or applied twice by a concurrent catch-up.
  learner_->Install(std::move(model), version, through, {});
  cv_.notify_all();
  if (live_changed_) live_changed_(version);
  LogInfo("rollback: model v{} is live again (was v{})", version, previous);
  event_("rollback", fmt::format("model v{} is live again (was v{}){}", version, previous,
                                 force ? ", forced" : ""));
  *result = {{"live_version", version}, {"previous", previous}};
  return Status::OK();
}

}  // namespace cortex
