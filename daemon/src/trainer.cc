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
namespace {

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

}  // namespace

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
    // Not in a sanitized build: there every thread runs many times slower and the suite
    // runs several daemons per core, so at nice 19 the trainer got a few percent of a core
    // and retrains took minutes (a test build; the races it checks do not depend on it).
    if (!kSanitized) setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), 19);
    Loop();
  });
}

void Trainer::Stop() {
  cv_.notify_all();
  if (!thread_.joinable()) return;
  thread_.join();
  if (!learner_->options().online_updates) return;
  // The daemon stops the trainer after the running tasks have ended (or the grace ran
  // out), so the outcomes they logged meanwhile are learned here, then the live weights are
  // saved as they are: a start restores exactly these, with training.online on (nothing
  // left to replay) or off (it cannot tell from the log which later events were stepped).
  // Bounded, so a long backlog (learning trails a burst) cannot hold the stop: what is left
  // is replayed by the next start with online updates on.
  const double deadline = env_->NowUnix() + kStopCatchUpS;
  long caught_up = 0;
  for (;;) {
    std::vector<LoggedOutcome> fresh = Read(/*events=*/true, learner_->trained_through(), 4096);
    for (const auto& o : fresh) {
      learner_->Observe(o);
      MaybeCheckpoint();
    }
    caught_up += static_cast<long>(fresh.size());
    if (fresh.empty()) break;
    if (env_->NowUnix() > deadline) {
      LogWarn(
          "stopping: learning is still {}+ event(s) behind after {} s; the next start with "
          "training.online on learns them",
          fresh.size(), kStopCatchUpS);
      break;
    }
  }
  if (caught_up > 0) LogInfo("stopping: learned the last {} event(s)", caught_up);
  MaybeCheckpoint(/*now=*/true);
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

std::vector<LoggedOutcome> Trainer::Read(bool events, long seq, size_t most) {
  std::vector<LoggedOutcome> out;
  auto take = [&](const LoggedOutcome& o) {
    out.push_back(o);
    return out.size() < most;
  };
  Status st = events ? store_->ForEachLearnEvent(seq, take) : store_->ForEachOutcome(seq, take);
  if (!st.ok())
    LogErrorRepeating("reading {}: {}", events ? "learning events" : "outcomes", st.ToString());
  return out;
}

void Trainer::SetRetention(int keep_versions, long checkpoint_every) {
  // At least one: the newest version is kept, so a number is never given twice.
  keep_versions_ = std::max(keep_versions, 1);
  checkpointer_.set_every(checkpoint_every);
}

Result<OnlineState> Trainer::Rebuild(const Activation& a, long step, long* from_checkpoint,
                                     int* chain) {
  *from_checkpoint = 0;
  if (chain) *chain = 0;
  OnlineState s;
  Checkpoint c;
  Status st = store_->LoadCheckpoint(a.id, step, &c);
  if (st.ok()) {
    // A delta names the checkpoint it is relative to: down the chain to a whole one, then
    // each delta applied on the way back up.
    std::vector<std::string> deltas;
    std::string blob = c.weights;
    int64_t base = 0;
    while (GatingModel::DeltaBase(blob, &base)) {
      deltas.push_back(std::move(blob));
      Checkpoint b;
      CORTEX_RETURN_IF_ERROR(store_->LoadCheckpoint(a.id, base, &b));
      if (b.step != base)
        return Status::Corruption(
            fmt::format("the checkpoint at step {} is relative to step {}, which the store lacks",
                        c.step, base));
      blob = std::move(b.weights);
    }
    auto m = GatingModel::Deserialize(blob);
    if (!m.ok()) return m.status().WithContext(fmt::format("checkpoint at step {}", c.step));
    for (auto d = deltas.rbegin(); d != deltas.rend(); ++d)
      CORTEX_RETURN_IF_ERROR(m->ApplyDelta(*d));
    if (chain) *chain = static_cast<int>(deltas.size());
    const long ring = std::min<long>(c.step, std::max(learner_->options().replay_buffer, 0));
    std::vector<LoggedOutcome> before;
    CORTEX_RETURN_IF_ERROR(store_->LearnEvents(a.after_seq, c.seq, ring, &before));
    auto r = learner_->Resume(a, c, std::move(m).value(), before);
    if (!r.ok()) return r.status();
    s = std::move(r).value();
    *from_checkpoint = c.step;
  } else if (st.code() == Status::Code::kNotFound) {
    GatingModel base(learner_->options().shape);
    if (a.version != 0) {
      ModelRecord rec;
      CORTEX_RETURN_IF_ERROR(store_->LoadModel(a.version, &rec));
      auto m = GatingModel::Deserialize(rec.weights);
      if (!m.ok()) return m.status().WithContext("model v" + std::to_string(a.version));
      base = std::move(m).value();
    }
    s = learner_->Begin(std::move(base), a);
  } else {
    return st;
  }
  // With online updates off, a start takes no steps after the newest checkpoint (none were
  // taken since, or they cannot be told from the log); `explain` replays what decisions say.
  if (!learner_->options().online_updates && step == LONG_MAX) return s;
  // The steps after it, in the store's sequence, a page at a time.
  while (s.step < step) {
    const size_t want = static_cast<size_t>(std::min<long>(step - s.step, 4096));
    std::vector<LoggedOutcome> page;
    CORTEX_RETURN_IF_ERROR(store_->ForEachLearnEvent(s.seq, [&](const LoggedOutcome& o) {
      page.push_back(o);
      return page.size() < want;
    }));
    if (page.empty()) break;
    for (const auto& o : page) learner_->Step(&s, o);
  }
  return s;
}

Status Trainer::LoadLiveModel() {
  Activation a;
  Status st = store_->LiveActivation(&a);
  if (st.code() == Status::Code::kNotFound) {  // a new store: the untrained model, from the start
    a = Activation{0, 0, 0, env_->NowUnix(), "initial"};
    CORTEX_RETURN_IF_ERROR(store_->SetLiveModel(0, 0, a.reason, a.time, &a.id));
  } else if (!st.ok()) {
    return st;
  }
  long from = 0;
  int chain = 0;
  auto state = Rebuild(a, LONG_MAX, &from, &chain);
  if (!state.ok()) return state.status().WithContext("the live model");
  LogInfo(
      "model v{} is live (activation {}, step {}: {} from a checkpoint, learned through event {})",
      a.version, a.id, state->step, from, state->seq);
  if (!learner_->options().online_updates) {
    // Events after the restored point are not learned now. After a clean stop there are
    // none but those logged since; after a crash, steps taken after the last checkpoint
    // were lost with the process: say so rather than route on older weights in silence.
    bool later = false;
    (void)store_->ForEachLearnEvent(state->seq, [&](const LoggedOutcome&) {
      later = true;
      return false;
    });
    if (later)
      LogWarn(
          "training.online is off: learning events after event {} are not learned (after "
          "an unclean stop, steps taken after the last checkpoint are among them); turn "
          "training.online on to learn them",
          state->seq);
  }
  checkpointer_.Restored(a.id, from, chain);
  learner_->Restore(std::move(state).value());
  return Status::OK();
}

void Trainer::MaybeCheckpoint(bool now) {
  auto c = checkpointer_.Take(*learner_, now);
  if (!c) return;
  Status st = store_->SaveCheckpoint(*c);
  if (!st.ok()) LogWarn("saving a checkpoint of the live model: {}", st.message());
  checkpointer_.Saved(*c, st.ok());
}

Status Trainer::Explain(const Task& t, json* out) {
  if (!t.decision) return Status::FailedPrecondition("task " + t.id + " has no decision");
  const Decision& d = *t.decision;
  if (d.model_step < 0)
    return Status::FailedPrecondition("task " + t.id + "'s decision names no online step (" +
                                      (d.model_version.empty()
                                           ? std::string("no model scored it")
                                           : "recorded by a cortex older than schema 4") +
                                      "): its weights cannot be rebuilt");
  // One rebuild at a time: each holds a whole model (tens of MB) while it replays, and a
  // burst of requests must not hold one each.
  std::lock_guard<std::mutex> one(explain_mu_);
  const auto t0 = std::chrono::steady_clock::now();
  Activation a;
  CORTEX_RETURN_IF_ERROR(store_->GetActivation(d.model_live, &a));
  long from = 0;
  auto state = Rebuild(a, d.model_step, &from, nullptr);
  if (!state.ok()) return state.status();
  if (state->step != d.model_step)
    return Status::Corruption(fmt::format(
        "the store holds {} learning events after v{} went live, the decision was made at step {}",
        state->step, a.version, d.model_step));
  std::vector<std::pair<std::string, float>> cands;
  std::vector<const Candidate*> recorded;
  for (const auto& c : d.candidates) {
    if (c.model_score == 0 && c.confidence == 0) continue;  // forced, not loaded: never scored
    cands.emplace_back(c.expert, static_cast<float>(c.prior));
    recorded.push_back(&c);
  }
  auto ex = learner_->Explain(state->model, t.text, t.tags, cands, 8);
  json list = json::array();
  bool all_equal = true;
  for (size_t i = 0; i < ex.size(); ++i) {
    json f = json::array();
    for (const auto& [name, c] : ex[i].features)
      f.push_back({{"feature", name}, {"contribution", c}});
    const bool equal = ex[i].model_score == recorded[i]->model_score;
    all_equal &= equal;
    list.push_back({{"expert", ex[i].expert},
                    {"model_score", ex[i].model_score},
                    {"recorded_model_score", recorded[i]->model_score},
                    {"equal", equal},
                    {"prior", recorded[i]->prior},
                    {"prior_part", ex[i].prior_part},
                    {"features", f}});
  }
  *out = {
      {"id", t.id},
      {"model_version", d.model_version},
      {"model_step", d.model_step},
      {"activation",
       {{"id", a.id}, {"version", a.version}, {"after_seq", a.after_seq}, {"reason", a.reason}}},
      {"from_checkpoint", from},
      {"replayed_steps", d.model_step - from},
      {"learned_through", state->seq},
      {"equal", all_equal},
      {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()},
      {"candidates", list}};
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
    woken_ = false;  // a Wake from here on is for outcomes this read may not see
    // A backstop for a notice lost with a broken connection (cluster only): every few
    // seconds, is the store's live activation newer than this node's?
    if (not_trainer_ && env_->NowUnix() >= next_live_check_) {
      next_live_check_ = env_->NowUnix() + kLiveCheckS;
      Activation store_live, mine;
      long step, seq;
      learner_->LiveStep(&mine, &step, &seq);
      if (store_->LiveActivation(&store_live).ok() && store_live.id > mine.id) reload_ = true;
    }
    if (reload_.exchange(false)) {  // another node's model is live: the same here
      if (Status st = LoadLiveModel(); !st.ok())
        LogError("loading the live model: {}", st.message());
    }
    // Online: every learning event logged since the last look, in the store's sequence, a
    // bounded batch at a time (after a burst, the next batch follows at once). A newly
    // live model learns from those after its own start; the retrain schedule counts each
    // outcome once. With online updates off the model's own mark stays put, so the loop
    // keeps one of its own.
    constexpr size_t kBatch = 4096;
    const long live_seq = learner_->trained_through();
    std::vector<LoggedOutcome> fresh =
        Read(/*events=*/true, learner_->options().online_updates ? live_seq : newest_seq_, kBatch);
    if (fresh.size() == kBatch) woken_ = true;
    long added = 0;
    // A checkpoint is due after each event, not each batch: checkpoints fall on the
    // `checkpoint_every` grid whatever the batches were, so `explain` replays the same.
    for (const auto& o : fresh) {
      learner_->Observe(o);
      MaybeCheckpoint();
      if (o.seq > newest_seq_) {
        newest_seq_ = o.seq;
        if (!o.feedback) ++added;
      }
    }
    MaybeCheckpoint();  // with no event: a model newly live, or a failed save
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
  // The newest learning event first: the outcomes read after it reflect every event up to
  // it (a verdict's corrected reward included), and a later one has a higher number.
  long newest_any = 0, newest_outcome = 0;
  CORTEX_RETURN_IF_ERROR(store_->NewestLearnSeq(&newest_any, &newest_outcome));
  long after = 0;
  CORTEX_RETURN_IF_ERROR(
      store_->OutcomeWindowStart(static_cast<long>(lo.max_examples) + lo.max_holdout, &after));
  std::vector<LoggedOutcome> history = Read(/*events=*/false, after);
  std::vector<ModelRecord> models;
  CORTEX_RETURN_IF_ERROR(store_->ListModels(&models));
  // Nothing new since the last retrain (no outcome, no verdict): the same data would make
  // the same candidate.
  // (What a version saw: its training rows and its holdout, up to `data_through`; a
  // version from before that was recorded saw up to its cutoff at least.)
  long last_through = 0;
  std::string last_name;
  for (const auto& m : models) {
    const json metrics = json::parse(m.metrics, nullptr, false);
    const long saw =
        metrics.is_object() ? metrics.value("data_through", m.trained_through) : m.trained_through;
    if (saw >= last_through) last_through = saw, last_name = Learner::VersionName(m.version);
  }
  if (!models.empty() && newest_any <= last_through) {
    const std::string why = "skipped: no new outcome or verdict since " + last_name +
                            " (which saw every one up to learning event " +
                            std::to_string(last_through) + ")";
    {
      std::lock_guard<std::mutex> l(mu_);
      retrain_log_.push_back(why);
    }
    cv_.notify_all();
    *summary = {{"skipped", true}, {"reason", why}, {"promoted", false}, {"live", false}};
    return Status::OK();
  }
  const int version = models.empty() ? 1 : models.back().version + 1;
  // The population's warm start: the live version's saved weights (v0 has none: fresh).
  GatingModel warm_model;
  WarmStart warm;
  if (lo.population > 1) {
    Activation live;
    long step, seq;
    learner_->LiveStep(&live, &step, &seq);
    ModelRecord rec;
    if (live.version > 0 && store_->LoadModel(live.version, &rec).ok()) {
      if (auto m = GatingModel::Deserialize(rec.weights); m.ok()) {
        warm_model = std::move(m).value();
        warm = {&warm_model, rec.trained_through};
      }
    }
  }
  auto res = learner_->Retrain(
      history, version, now,
      [this](const std::string& msg) {
        {
          std::lock_guard<std::mutex> l(mu_);
          retrain_log_.push_back(msg);
        }
        cv_.notify_all();
      },
      warm);
  if (!res.ok()) return res.status();
  // A stop asked for while training ends the retrain here: nothing is saved or promoted.
  if (stop_->load()) return Status::Unavailable("training was cancelled: cortexd is stopping");
  ModelRecord rec = res->record;
  if (json m = json::parse(rec.metrics, nullptr, false); m.is_object() && !history.empty()) {
    m["data_through"] = std::max(newest_any, history.back().seq);
    rec.metrics = m.dump();
  }
  rec.weights = res->model.Serialize();
  rec.live = res->promoted;
  long activation = 0;
  CORTEX_RETURN_IF_ERROR(store_->SaveModel(rec, &activation));
  if (res->promoted) {
    // Live from its cutoff on: the loop's next look takes the steps on what came after.
    learner_->Install(std::move(res->model),
                      Activation{activation, version, rec.trained_through, now, "promoted"});
    woken_ = true;
    if (live_changed_) live_changed_(version);
  } else {
    std::vector<int> pruned;
    if (Status st = store_->PruneModels(keep_versions_.load(), &pruned); !st.ok())
      LogWarn("pruning refused model versions: {}", st.message());
    else if (!pruned.empty())
      LogInfo("pruned {} refused model version(s) beyond training.keep_versions ({})",
              pruned.size(), keep_versions_.load());
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
  Activation live;
  long step = 0, seq = 0;
  learner_->LiveStep(&live, &step, &seq);
  *result = {{"models", a},
             {"live_version", live.version},
             {"live_step", step},
             {"live",
              {{"version", live.version},
               {"name", Learner::VersionName(live.version)},
               {"activation", live.id},
               {"reason", live.reason},
               {"since", live.time > 0 ? json(wire::IsoTime(live.time)) : json(nullptr)},
               {"after_seq", live.after_seq},
               {"step", step},
               {"learned_through", seq}}}};
  return Status::OK();
}

Status Trainer::Rollback(int version, bool force, json* result) {
  Activation live;
  long live_step = 0, live_seq = 0;
  learner_->LiveStep(&live, &live_step, &live_seq);
  // Nothing to do, and no event to record: those weights are live as saved. (A live
  // version that has learned since goes back to its saved weights.)
  if (version == live.version && live_step == 0) {
    *result = {{"live_version", version}, {"previous", version}, {"unchanged", true}};
    return Status::OK();
  }
  GatingModel model(learner_->options().shape);
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
  }
  const int previous = live.version;
  // Exactly the saved weights, learning online from the events that come after now (the
  // trainer thread feeds them, as it does every step).
  long newest = 0, newest_outcome = 0;
  CORTEX_RETURN_IF_ERROR(store_->NewestLearnSeq(&newest, &newest_outcome));
  Activation a{0, version, newest, env_->NowUnix(), "rollback"};
  CORTEX_RETURN_IF_ERROR(store_->SetLiveModel(version, newest, a.reason, a.time, &a.id));
  learner_->Install(std::move(model), a);
  cv_.notify_all();
  if (live_changed_) live_changed_(version);
  LogInfo("rollback: model v{} is live again (was v{})", version, previous);
  event_("rollback", fmt::format("model v{} is live again (was v{}){}", version, previous,
                                 force ? ", forced" : ""));
  *result = {{"live_version", version}, {"previous", previous}};
  return Status::OK();
}

}  // namespace cortex
