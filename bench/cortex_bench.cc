// cortex-bench: the project's own measurements. Subcommands:
//   throughput  tasks/s through a running cortexd (clients submitting with --wait)
//   score       routing throughput and single-decision latency (gating model, cpu or cuda)
//   train       training throughput (cpu or cuda)
//   replay      learning quality on a real task stream (replay.cc)
//   soak        a cortexd under load with misbehaving experts (soak.cc)
//   explain     `explain` on a store of a million outcomes (explain.cc)
#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "bench.h"
#include "cortex/client.h"
#include "cortex/paths.h"
#include "cortex/router.h"

namespace {

using cortex::bench::Percentile;
using cortex::bench::WriteJson;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// One run: `tasks` submit --wait calls shared by `clients` connections; its figures in
// *out. Tasks that got no answer (a client that could not connect, a request that failed)
// are `errors`, and the first reason is said on stderr.
// `log`: the store's write-ahead log, whose largest size during the run is reported (its
// bound under sustained load); empty for a cortexd not our own.
// Client c talks to sockets[c % sockets.size()] (a cluster's nodes, or one cortexd).
int Throughput(const std::vector<std::string>& sockets, int clients, int tasks,
               const std::string& text, const std::string& log, json* out) {
  std::atomic<bool> running{true};
  std::atomic<uintmax_t> log_peak{0};
  std::thread watch_log([&] {
    while (!log.empty() && running.load()) {
      std::error_code ec;
      const uintmax_t size = std::filesystem::file_size(log, ec);
      if (!ec && size > log_peak.load()) log_peak = size;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  std::atomic<int> next{0}, ok{0}, failed{0};
  std::mutex why_mu;
  std::string why;
  auto error = [&](const std::string& what) {
    std::lock_guard<std::mutex> l(why_mu);
    if (why.empty()) why = what;
  };
  std::vector<std::vector<double>> lat(static_cast<size_t>(clients));
  auto t0 = Clock::now();
  std::vector<std::thread> ts;
  for (int c = 0; c < clients; ++c)
    ts.emplace_back([&, c] {
      cortex::Client cl;
      if (cortex::Status st = cl.Connect(sockets[static_cast<size_t>(c) % sockets.size()]);
          !st.ok())
        return error(st.ToString());
      while (next.fetch_add(1) < tasks) {
        auto s = Clock::now();
        json resp;
        cortex::Status st = cl.Call({{"op", "submit"}, {"text", text}, {"wait", true}}, &resp);
        lat[static_cast<size_t>(c)].push_back(
            std::chrono::duration<double, std::milli>(Clock::now() - s).count());
        if (!st.ok())
          error(st.ToString());
        else if (!resp.value("ok", false))
          error(resp.dump());
        else if (resp["result"].value("state", "") == "succeeded")
          ++ok;
        else
          ++failed;
      }
    });
  for (auto& t : ts) t.join();
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  running = false;
  watch_log.join();
  const int done = ok.load() + failed.load();  // only answered tasks count towards the rate
  if (!why.empty()) std::fprintf(stderr, "cortex-bench: first error: %s\n", why.c_str());
  std::vector<double> all;
  for (auto& v : lat) all.insert(all.end(), v.begin(), v.end());
  *out = {{"clients", clients},
          {"tasks", tasks},
          {"seconds", secs},
          {"tasks_per_s", done / secs},
          {"succeeded", ok.load()},
          {"failed", failed.load()},
          {"errors", tasks - done},
          {"p50_ms", Percentile(all, 0.5)},
          {"p99_ms", Percentile(all, 0.99)}};
  if (!log.empty()) (*out)["log_peak_mib"] = static_cast<double>(log_peak.load()) / (1 << 20);
  return done == tasks ? 0 : 1;
}

// Every client count against one cortexd, a table row each; the runs appended to *runs.
int ThroughputRuns(const std::vector<std::string>& sockets, const std::string& store,
                   const std::string& log, const std::vector<int>& clients, int tasks,
                   const std::string& text, json* runs) {
  int rc = 0;
  for (int c : clients) {
    json r;
    rc |= Throughput(sockets, c, tasks, text, log, &r);
    r["store"] = store;
    std::printf(
        "%-7s %7d %9.0f %9.2f %9.2f %9d %6d %6d %9s\n", store.c_str(), c,
        r["tasks_per_s"].get<double>(), r["p50_ms"].get<double>(), r["p99_ms"].get<double>(),
        r["succeeded"].get<int>(), r["failed"].get<int>(), r["errors"].get<int>(),
        r.contains("log_peak_mib") ? fmt::format("{:.0f}", r["log_peak_mib"].get<double>()).c_str()
                                   : "-");
    std::fflush(stdout);
    runs->push_back(std::move(r));
  }
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cortex-bench: Cortex's own benchmarks"};
  app.set_version_flag("--version", std::string("cortex-bench ") + cortex::CortexVersion());
  app.require_subcommand(1);
  std::string json_out, socket, text = "run the no-op command";
  std::vector<int> clients = {1, 8, 32, 128};
  int tasks = 2000;
  std::string store = "both", store_url;
  int nodes = 1;
  auto* tp = app.add_subcommand(
      "throughput",
      "tasks/s and latency through cortexd (submit --wait) for each client count; without "
      "--socket, through a cortexd of its own (temporary store, fsync on, an in-host no-op "
      "expert), on disk and on tmpfs so the fsync's share shows, and nothing lands in your "
      "audit log");
  tp->add_option("--socket", socket,
                 "measure the cortexd at this socket instead (its audit log records the tasks)");
  tp->add_option("--clients", clients, "concurrent clients, one run each (default 1 8 32 128)")
      ->check(CLI::Range(1, 1024));
  tp->add_option("--tasks", tasks, "tasks per run (default 2000)")->check(CLI::Range(1, 10000000));
  tp->add_option("--store", store,
                 "without --socket: its cortexd's store on disk, on tmpfs, or both (default)")
      ->check(CLI::IsMember({"disk", "tmpfs", "both"}));
  tp->add_option("--store-url", store_url,
                 "without --socket: its cortexd nodes on this PostgreSQL database instead (a "
                 "postgresql:// URI; use an empty database: the runs' tasks stay in it)");
  tp->add_option("--nodes", nodes,
                 "with --store-url: that many cortexd nodes, the clients spread over them "
                 "(default 1)")
      ->check(CLI::Range(1, 100));
  tp->add_option("--text", text, "the task text");
  tp->add_option("--json", json_out, "write the figures to this file");
  cortex::bench::SpeedOptions so;
  auto* sc = app.add_subcommand("score", "routing throughput and single-decision latency");
  sc->add_option("--experts", so.experts, "experts scored per task (default 16)")
      ->check(CLI::Range(1, 4096));
  sc->add_option("--batch", so.batches, "batch size(s), e.g. --batch 1 64 1024 65536")
      ->check(CLI::Range(1, 1 << 20));
  sc->add_option("--backend", so.backend, "cpu, cuda or auto (default cpu)")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  sc->add_option("--min-tasks", so.min_tasks, "tasks scored per batch size")
      ->check(CLI::Range(1, 100000000));
  sc->add_option("--json", so.json_out, "write the figures to this file");
  auto* tr = app.add_subcommand("train", "training throughput");
  tr->add_option("--examples", so.examples, "training examples (default 100000)")
      ->check(CLI::Range(100, 100000000));
  tr->add_option("--epochs", so.epochs, "passes over the examples (default 2)")
      ->check(CLI::Range(1, 100));
  tr->add_option("--experts", so.experts, "experts per example (default 16)")
      ->check(CLI::Range(1, 4096));
  tr->add_option("--batch", so.batches, "minibatch size(s)")->check(CLI::Range(1, 1 << 20));
  tr->add_option("--backend", so.backend, "cpu, cuda or auto (default cpu)")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  tr->add_option("--population", so.population,
                 "also fit a retrain's population of this many candidates (training.population) "
                 "and report candidates/s")
      ->check(CLI::Range(1, 4));
  tr->add_option("--json", so.json_out, "write the figures to this file");
  cortex::bench::SoakOptions sk;
  auto* soak = app.add_subcommand(
      "soak", "a cortexd of its own under load, with crashing, hanging and slow experts");
  soak->add_option("--clients", sk.clients, "concurrent clients (default 8)")
      ->check(CLI::Range(1, 512));
  soak->add_option("--seconds", sk.seconds, "how long to run (default 30)")
      ->check(CLI::Range(1.0, 86400.0));
  soak->add_option("--cortexd", sk.cortexd, "the cortexd to run (default: beside this tool)");
  soak->add_option("--json", sk.json_out, "write the figures to this file");
  cortex::bench::ExplainOptions eo;
  auto* ex = app.add_subcommand(
      "explain",
      "how long `explain` takes on a large store: writes one (routed and learned as cortexd "
      "does), starts a cortexd on it and explains decisions spread over it, bit for bit");
  ex->add_option("--outcomes", eo.outcomes, "tasks in the store (default 1000000)")
      ->check(CLI::Range(1000L, 100000000L));
  ex->add_option("--checkpoint-every", eo.checkpoint_every,
                 "online steps between checkpoints (training.checkpoint_every)")
      ->check(CLI::Range(1L, 100000000L));
  ex->add_option("--corpus", eo.corpus, "task texts: a TSV whose last column is the text");
  ex->add_option("--cortexd", eo.cortexd, "the cortexd to run (default: beside this tool)");
  ex->add_option("--json", eo.json_out, "write the figures to this file");
  cortex::bench::ReplayOptions ro;
  auto* rp = app.add_subcommand("replay", "learning quality on a real task stream");
  rp->add_option("--corpus", ro.corpus, "TSV corpus (id, unix_time, type, scope, text)")
      ->required();
  rp->add_option("--late-expert", ro.late_expert, "withhold this expert until --at");
  rp->add_option("--at", ro.late_at, "fraction of the stream at which the late expert appears")
      ->check(CLI::Range(0.0, 0.79));
  rp->add_option("--config", ro.config, "take router, training and rules from this config");
  rp->add_option("--seed", ro.seed, "random seed of the router's exploration (default 1)");
  rp->add_option("--epochs", ro.learner.train.epochs,
                 "passes over the history per retrain, at most (default 4)")
      ->check(CLI::Range(1, 100));
  rp->add_option("--hidden", ro.learner.shape.hidden, "hidden units of the gating MLP")
      ->check(CLI::Range(1, 1024));
  rp->add_option("--ips-clip", ro.learner.ips_clip, "largest inverse-propensity weight in training")
      ->check(CLI::Range(1.0, 1e6));
  rp->add_option("--lr", ro.learner.train.lr, "learning rate of retrains (MLP)");
  rp->add_option("--lr-wide", ro.learner.train.lr_wide,
                 "learning rate of retrains (the wide, per-feature part)");
  rp->add_option("--population", ro.learner.population,
                 "candidates each retrain fits, the best kept (training.population)")
      ->check(CLI::Range(1, 4));
  rp->add_option("--validation-fraction", ro.learner.validation_fraction,
                 "newest share of a retrain's rows that chooses its epochs (0: all epochs)")
      ->check(CLI::Range(0.0, 0.5));
  rp->add_flag("--shuffle", ro.learner.train.shuffle,
               "retrains pass over the history in a seeded shuffled order, not in time order");
  rp->add_option("--online-lr", ro.learner.online.lr, "learning rate of online updates (MLP)");
  rp->add_option("--online-lr-wide", ro.learner.online.lr_wide,
                 "learning rate of online updates (the wide part)");
  rp->add_option("--online-replay", ro.learner.online_replay,
                 "past outcomes replayed with each online update");
  rp->add_flag(
      "--no-online", [&](int64_t) { ro.learner.online_updates = false; }, "learn only at retrains");
  rp->add_option("--max-attempts", ro.max_attempts,
                 "attempts per task: a failed one falls back to the next candidate, as cortexd "
                 "does (default router.max_attempts; 1: no fallbacks)")
      ->check(CLI::Range(1, 32));
  rp->add_flag("-v,--verbose", ro.verbose, "print each retrain");
  rp->add_option("--json", ro.json_out, "write the figures to this file");
  rp->add_option("--html", ro.html_out,
                 "write a page with the learning curve against the baselines and each "
                 "expert's share over time");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (rp->parsed()) {
    return cortex::bench::Replay(ro);
  }
  if (ex->parsed()) return cortex::bench::Explain(eo);
  if (tp->parsed()) {
    std::printf("%-7s %7s %9s %9s %9s %9s %6s %6s %9s\n", "store", "clients", "tasks/s", "p50 ms",
                "p99 ms", "succeeded", "failed", "errors", "log MiB");
    json runs = json::array();
    int rc = 0;
    const int most = *std::max_element(clients.begin(), clients.end());
    const std::string noop =
        "router: {exploration: 0}\n"
        "experts:\n  - {name: noop, plugin: misbehave, capacity: 64, keywords: [no-op]}\n";
    if (!socket.empty()) {
      rc = ThroughputRuns({socket}, "given", "", clients, tasks, text, &runs);
    } else if (!store_url.empty()) {
      // A cluster of `nodes` on the database, every node hosting the no-op expert.
      std::vector<std::unique_ptr<cortex::bench::PrivateDaemon>> ds;
      std::vector<std::string> sockets;
      for (int n = 0; n < nodes; ++n) {
        ds.push_back(std::make_unique<cortex::bench::PrivateDaemon>());
        ds.back()->store_url = store_url;
        if (!ds.back()->Start(
                "", fmt::format("workers: 8, max_connections: {}, node: bench{}", most + 8, n), "",
                noop))
          return 1;
        sockets.push_back(ds.back()->socket);
      }
      rc |= ThroughputRuns(sockets, fmt::format("pg/{}", nodes), "", clients, tasks, text, &runs);
      for (auto& d : ds)
        if (int stop = d->Stop(); stop != 0) {
          std::fprintf(stderr, "cortex-bench: a node exited %d (log kept: %s/cortexd.log)\n", stop,
                       d->dir.c_str());
          d->dir.clear();
          rc = 1;
        }
    } else {
      std::vector<std::pair<std::string, std::string>> media;  // name, base folder
      if (store != "tmpfs") media.emplace_back("disk", "/tmp");
      if (store != "disk") media.emplace_back("tmpfs", "/dev/shm");
      for (const auto& [name, base] : media) {
        cortex::bench::PrivateDaemon d;
        if (!d.Start("", fmt::format("workers: 8, max_connections: {}", most + 8), "", noop, base))
          return 1;
        std::fprintf(stderr, "cortex-bench: %s: through a cortexd of its own (%s)\n", name.c_str(),
                     d.dir.c_str());
        rc |= ThroughputRuns({d.socket}, name, (d.dir / "data/cortex.db-wal").string(), clients,
                             tasks, text, &runs);
        if (int stop = d.Stop(); stop != 0) {
          std::fprintf(stderr, "cortex-bench: its cortexd exited %d (log kept: %s/cortexd.log)\n",
                       stop, d.dir.c_str());
          d.dir.clear();  // keep the folder for the log
          return 1;
        }
      }
    }
    std::printf(
        "(submit --wait end to end, %d tasks per run; acknowledged only once durable; log MiB: "
        "the store's write-ahead log at its largest)\n",
        tasks);
    WriteJson(json_out, {{"runs", runs}});
    return rc;
  }
  if (tr->parsed()) return cortex::bench::Train(so);
  if (soak->parsed()) return cortex::bench::Soak(sk);
  return cortex::bench::Score(so);
}
