// cortex-bench explain: how long `cortexctl explain` takes on a large store. It writes a
// SQLite store of --outcomes routed and finished tasks the way cortexd does (the same
// router over the same learner, one online step per outcome in the store's sequence, a
// checkpoint every --checkpoint-every steps), starts a cortexd of its own on it, and times
// `explain` on decisions spread over the whole log, each one checked bit for bit.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>

#include <fmt/format.h>

#include "bench.h"
#include "cortex/checkpointer.h"
#include "cortex/client.h"
#include "cortex/router.h"
#include "cortex/store.h"

namespace cortex::bench {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Task texts: the shipped commit subjects with a number, or words drawn from a small
// vocabulary when there is no sample (any text works; variety makes the weights realistic).
std::vector<std::string> Texts(const std::string& corpus) {
  std::vector<std::string> out;
  std::ifstream in(corpus);
  std::string line;
  while (std::getline(in, line)) {
    const size_t tab = line.rfind('\t');
    if (tab != std::string::npos && line.compare(0, 3, "id\t") != 0)
      out.push_back(line.substr(tab + 1));
  }
  if (out.empty())
    for (const char* s : {"fix the login bug", "restart redis", "update the docs",
                          "speed up the cache", "bump a dependency"})
      out.push_back(s);
  return out;
}

}  // namespace

int Explain(const ExplainOptions& opt) {
  PrivateDaemon daemon;
  std::string tmpl = "/tmp/cortex-bench-explain-XXXXXX";
  if (!mkdtemp(tmpl.data())) return std::perror("cortex-bench: mkdtemp"), 1;
  const fs::path dir = tmpl;
  const std::string db = (dir / "cortex.db").string();
  struct Cleanup {
    fs::path d;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(d, ec);
    }
  } cleanup{dir};

  // The writer: the store, a learner as cortexd builds it, and its router.
  auto opened = OpenStore(db);
  if (!opened.ok())
    return std::fprintf(stderr, "cortex-bench: %s\n", opened.status().ToString().c_str()), 1;
  std::unique_ptr<Store> store = std::move(opened).value();
  LearnerOptions lo;
  auto learner =
      std::make_shared<Learner>(lo, FeatureHasher(lo.shape.bits), MakeCpuEngine(), MakeCpuEngine());
  Activation live{0, 0, 0, 0, "initial"};
  if (Status st = store->SetLiveModel(0, 0, "initial", 0, &live.id); !st.ok())
    return std::fprintf(stderr, "cortex-bench: %s\n", st.ToString().c_str()), 1;
  learner->Install(GatingModel(lo.shape), live);
  Router router(RouterOptions{0.05, 0, 1}, RuleSet(), MakeGatingScorer(learner), learner->hasher());
  const std::vector<std::string> names = {"bugfix", "docs", "perf", "deps", "ops"};
  std::vector<ExpertSlot> slots;
  for (const auto& n : names)
    slots.push_back({{n, learner->hasher().Manifest({n, "", {n}, {}})}, 0, 0});
  const std::vector<std::string> texts = Texts(opt.corpus);
  std::mt19937_64 rng(7);

  const auto t0 = Clock::now();
  long done = 0, seq = 0, checkpoints = 0, checkpoint_bytes = 0;
  Checkpointer checkpointer(opt.checkpoint_every);
  long whole_bytes = 0, delta_bytes = 0;
  double learn_s = 0;
  std::vector<std::string> ids;  // 200 tasks spread over the log, explained later
  constexpr int kBatch = 100;    // decisions a batch apart in steps: explains replay 0..every-100
  while (done < opt.outcomes) {
    const int n = static_cast<int>(std::min<long>(kBatch, opt.outcomes - done));
    std::vector<RouteRequest> reqs;
    std::vector<Task> tasks(n);
    for (int i = 0; i < n; ++i) {
      Task& t = tasks[i];
      t.id = fmt::format("{:012x}{:04x}", done + i, static_cast<unsigned>(rng() & 0xffff));
      t.text = texts[(done + i) % texts.size()] + " " + std::to_string((done + i) % 1000);
      t.created_at = t.updated_at = 1.7e9 + static_cast<double>(done + i);
      reqs.push_back({t.text, {}});
    }
    std::vector<Decision> decisions;
    if (Status st = router.Route(reqs, slots, true, 1.7e9 + done, &decisions); !st.ok())
      return std::fprintf(stderr, "cortex-bench: %s\n", st.ToString().c_str()), 1;
    std::vector<Store::Admission> adm;
    std::vector<Status> sts;
    for (int i = 0; i < n; ++i)
      adm.push_back({&tasks[i], &decisions[i], decisions[i].chosen, true});
    store->Admit(adm, &sts);
    std::vector<Outcome> outcomes(n);
    std::vector<Store::AttemptEnd> ends;
    for (int i = 0; i < n; ++i) {
      // The right expert is a function of the text: the model has something to learn.
      const bool right =
          decisions[i].chosen == names[std::hash<std::string>()(reqs[i].text) % names.size()];
      outcomes[i].kind = right ? OutcomeKind::kSuccess : OutcomeKind::kFailure;
      outcomes[i].quality = right ? 1 : 0;
      ends.push_back({tasks[i].id, 1, &outcomes[i], tasks[i].created_at + 1,
                      right ? TaskState::kSucceeded : TaskState::kFailed});
      // (Off the checkpoints' grid, so that most explains replay steps after one.)
      if ((done + i) % (opt.outcomes / 200 + 37) == 0) ids.push_back(tasks[i].id);
    }
    store->FinishAttempts(ends, &sts);
    for (const auto& s : sts)
      if (!s.ok()) return std::fprintf(stderr, "cortex-bench: %s\n", s.ToString().c_str()), 1;
    // The trainer's loop: every event since the last look, a checkpoint when one is due.
    const auto tl = Clock::now();
    Status saved;
    (void)store->ForEachLearnEvent(seq, [&](const LoggedOutcome& o) {
      learner->Observe(o);
      seq = o.seq;
      if (auto c = checkpointer.Take(*learner)) {
        saved = store->SaveCheckpoint(*c);
        checkpointer.Saved(*c, saved.ok());
        int64_t base;
        (GatingModel::DeltaBase(c->weights, &base) ? delta_bytes : whole_bytes) +=
            static_cast<long>(c->weights.size());
        ++checkpoints;
        checkpoint_bytes += static_cast<long>(c->weights.size());
      }
      return saved.ok();
    });
    if (!saved.ok()) return std::fprintf(stderr, "cortex-bench: %s\n", saved.ToString().c_str()), 1;
    learn_s += Since(tl);
    done += n;
    if (done % 100000 == 0)
      std::fprintf(stderr, "  %ld outcomes written (%.0f s, %.0f s learning)\n", done, Since(t0),
                   learn_s);
  }
  const double write_s = Since(t0);
  store.reset();
  const double store_mb = static_cast<double>(fs::file_size(db)) / 1e6;

  // A cortexd on that store: its start rebuilds the live weights from the last checkpoint.
  const auto ts = Clock::now();
  daemon.store_path = db;
  daemon.start_timeout_s = 1800;  // it checks a store of gigabytes before it answers
  if (!daemon.Start(opt.cortexd, "workers: 2", "watch: false",
                    "router: {exploration: 0.05, seed: 1}\ntraining: {interval: 24h, "
                    "min_new_outcomes: 100000000, checkpoint_every: " +
                        std::to_string(opt.checkpoint_every) + "}\n"))
    return 1;
  const double start_s = Since(ts);
  Client client;
  if (Status st = client.Connect(daemon.socket); !st.ok())
    return std::fprintf(stderr, "cortex-bench: %s\n", st.ToString().c_str()), 1;
  std::vector<double> wall, inside, replayed;
  long unequal = 0, replayed_max = 0, replayed_sum = 0;
  for (const auto& id : ids) {
    nlohmann::json r;
    const auto te = Clock::now();
    Status st = client.Call({{"op", "explain"}, {"id", id}}, &r);
    wall.push_back(Since(te));
    if (!st.ok() || !r.value("ok", false))
      return std::fprintf(stderr, "cortex-bench: explain %s: %s %s\n", id.c_str(),
                          st.ToString().c_str(), r.dump().c_str()),
             1;
    const auto& res = r["result"];
    inside.push_back(res.value("seconds", 0.0));
    unequal += !res.value("equal", false);
    replayed_max = std::max(replayed_max, res.value("replayed_steps", 0L));
    replayed_sum += res.value("replayed_steps", 0L);
    replayed.push_back(res.value("replayed_steps", 0.0));
  }
  // Time inside cortexd as a line in the steps replayed (least squares): what reading the
  // checkpoints costs, what a step costs, and so the slowest an explain can be, replaying
  // checkpoint_every - 1 steps.
  double fixed_s = 0, per_step_s = 0;
  {
    const double n = static_cast<double>(inside.size());
    double sx = 0, sy = 0, sxx = 0, sxy = 0;
    for (size_t i = 0; i < inside.size(); ++i)
      sx += replayed[i], sy += inside[i], sxx += replayed[i] * replayed[i],
          sxy += replayed[i] * inside[i];
    const double den = n * sxx - sx * sx;
    if (n > 1 && den > 0) {
      per_step_s = (n * sxy - sx * sy) / den;
      fixed_s = (sy - per_step_s * sx) / n;
    }
  }
  nlohmann::json out = {
      {"outcomes", opt.outcomes},
      {"checkpoint_every", opt.checkpoint_every},
      {"checkpoints", checkpoints},
      {"checkpoint_mb_mean", checkpoints ? checkpoint_bytes / 1e6 / checkpoints : 0.0},
      {"checkpoint_mb_total", checkpoint_bytes / 1e6},
      {"whole_checkpoint_mb_total", whole_bytes / 1e6},
      {"delta_checkpoint_mb_total", delta_bytes / 1e6},
      {"store_mb", store_mb},
      {"write_s", write_s},
      {"online_learning_s", learn_s},
      {"cortexd_start_s", start_s},
      {"explained", wall.size()},
      {"not_bit_equal", unequal},
      {"replayed_steps_max", replayed_max},
      {"replayed_steps_mean", wall.empty() ? 0.0 : static_cast<double>(replayed_sum) / wall.size()},
      {"explain_s",
       {{"p50", Percentile(wall, 0.5)},
        {"p99", Percentile(wall, 0.99)},
        {"max", Percentile(wall, 1.0)}}},
      {"explain_inside_cortexd_s",
       {{"p50", Percentile(inside, 0.5)},
        {"max", Percentile(inside, 1.0)},
        {"fit_fixed", fixed_s},
        {"fit_per_step", per_step_s},
        {"fit_at_most_steps",
         fixed_s + per_step_s * static_cast<double>(opt.checkpoint_every - 1)}}}};
  std::printf("%s\n", out.dump(2).c_str());
  WriteJson(opt.json_out, out);
  if (daemon.Stop() != 0)
    return std::fprintf(stderr, "cortex-bench: cortexd did not stop cleanly\n"), 1;
  return unequal == 0 ? 0 : 1;
}

}  // namespace cortex::bench
