// cortex-bench soak: N clients for T seconds against a cortexd of its own whose experts
// (instances of bench/plugins/misbehave.cc, each in its own plugin host) include one
// whose plugin segfaults, one that hangs past its timeout ignoring cancellation, one that
// runs into its host's memory limit and a slow one. Quarantined experts are released as
// an operator would. Reports tasks/s, latency percentiles, acknowledged tasks lost (must
// be 0), crashes survived and cortexd's resident memory over time (must stay flat).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <thread>

#include "bench.h"
#include "cortex/client.h"

namespace cortex::bench {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

long RssKiB(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
  return 0;
}

}  // namespace

int Soak(const SoakOptions& o) {
  PrivateDaemon d;
  if (!d.Start(o.cortexd, "workers: 8, shutdown_grace: 2s",
               "memory_limit: 256MiB, quarantine_after: 5, restart_backoff: 50ms",
               "router: {exploration: 0.1, max_attempts: 3}\n"
               "training: {interval: 5s, min_new_outcomes: 200}\n"
               "experts:\n"
               "  - {name: crasher, plugin: misbehave, mode: crash, rate: 0.3, "
               "keywords: [build, crash]}\n"
               "  - {name: hanger, plugin: misbehave, mode: hang, rate: 0.3, timeout: 300ms, "
               "keywords: [deploy, hang]}\n"
               "  - {name: hog, plugin: misbehave, mode: oom, rate: 0.2, memory_mb: 1024, "
               "keywords: [memory, cache]}\n"
               "  - {name: slow, plugin: misbehave, mode: slow, delay_ms: 50, "
               "keywords: [report, slow]}\n"
               "  - {name: steady, plugin: misbehave, keywords: [fix, bug]}\n"))
    return 1;
  const pid_t pid = d.pid;
  const std::string socket = d.socket;

  const char* texts[] = {"fix the login bug",        "build the release artifacts",
                         "deploy the canary",        "write the weekly report",
                         "fix crash in the parser",  "slow report for finance",
                         "hang detector for deploy", "memory use of the cache"};
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::vector<double> lat;
  std::set<std::string> acked, unfinished;
  long succeeded = 0, failed = 0, errors = 0, crashes = 0, timeouts = 0;
  std::vector<std::pair<double, long>> rss;  // (seconds, KiB)
  const auto t0 = Clock::now();
  auto secs = [&] { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  std::thread sampler([&] {
    while (!stop.load()) {
      rss.emplace_back(secs(), RssKiB(pid));
      usleep(250000);
    }
  });
  // An operator who releases quarantined experts (after 5 crashes in a row).
  long released = 0;
  std::thread releaser([&] {
    Client c;
    if (!c.Connect(socket).ok()) return;
    while (!stop.load()) {
      json r;
      if (c.Call({{"op", "experts"}}, &r).ok() && r.value("ok", false))
        for (const auto& e : r["result"])
          if (e.value("state", "") == "quarantined") {
            json x;
            if (c.Call({{"op", "release"}, {"expert", e["name"]}}, &x).ok() && x.value("ok", false))
              ++released;
          }
      usleep(500000);
    }
  });
  std::vector<std::thread> clients;
  for (int c = 0; c < o.clients; ++c)
    clients.emplace_back([&, c] {
      Client cl;
      if (!cl.Connect(socket).ok()) return;
      for (int i = c; !stop.load(); i += o.clients) {
        const auto s = Clock::now();
        json resp;
        Status st = cl.Call({{"op", "submit"},
                             {"text", std::string(texts[i % 8]) + " #" + std::to_string(i)},
                             {"wait", true},
                             {"timeout_s", 60}},
                            &resp);
        const double ms = std::chrono::duration<double, std::milli>(Clock::now() - s).count();
        std::lock_guard<std::mutex> l(mu);
        if (!st.ok() || !resp.value("ok", false)) {
          ++errors;
          if (!st.ok()) return;
          continue;
        }
        const json& r = resp["result"];
        const std::string id = r.value("id", "");
        acked.insert(id);
        lat.push_back(ms);
        const std::string state = r.value("state", "");
        if (state == "succeeded")
          ++succeeded;
        else if (state == "failed")
          ++failed;
        else
          unfinished.insert(id);
        for (const auto& a : r.value("attempts", json::array())) {
          const std::string kind = a.value("outcome", json::object()).value("kind", "");
          crashes += kind == "crash";
          timeouts += kind == "timeout";
        }
      }
    });
  while (secs() < o.seconds) usleep(100000);
  stop = true;
  for (auto& t : clients) t.join();
  sampler.join();
  releaser.join();
  const double elapsed = secs();

  // Lost: acknowledged, yet not in a final state once the daemon has drained.
  long lost = 0, host_crashes = 0, restarts = 0;
  {
    Client c;
    json r;
    if (c.Connect(socket).ok() && c.Call({{"op", "experts"}}, &r).ok() && r.value("ok", false))
      for (const auto& e : r["result"]) {
        host_crashes += e["health"].value("crashes", 0L);
        restarts += e["health"].value("restarts", 0L);
      }
  }
  {
    Client c;
    if (c.Connect(socket).ok())
      for (const auto& id : unfinished) {
        json r;
        if (!c.Call({{"op", "show"}, {"id", id}}, &r).ok() || !r.value("ok", false)) {
          ++lost;
          continue;
        }
        const std::string s = r["result"].value("state", "");
        if (s != "succeeded" && s != "failed" && s != "interrupted") ++lost;
      }
  }
  const bool alive = kill(pid, 0) == 0;
  const int exit_code = d.Stop();

  // Flat memory: the steady level (median) of the last quarter against that of the second
  // (the first holds start-up). Retrains every few seconds add short spikes (they read
  // and featurize the retrain window, then give it back), so peaks are reported apart.
  long peak = 0, q2_peak = 0, q4_peak = 0;
  std::vector<double> q2s, q4s;
  for (const auto& [t, kib] : rss) {
    peak = std::max(peak, kib);
    if (t >= elapsed * 0.25 && t < elapsed * 0.5)
      q2s.push_back(kib), q2_peak = std::max(q2_peak, kib);
    if (t >= elapsed * 0.75) q4s.push_back(kib), q4_peak = std::max(q4_peak, kib);
  }
  const long q2 = static_cast<long>(Percentile(q2s, 0.5)),
             q4 = static_cast<long>(Percentile(q4s, 0.5));
  const bool flat = q4 <= q2 + q2 / 5;  // within 20%
  json j = {{"clients", o.clients},
            {"seconds", elapsed},
            {"tasks", static_cast<long>(acked.size())},
            {"tasks_per_s", acked.size() / elapsed},
            {"p50_ms", Percentile(lat, 0.5)},
            {"p99_ms", Percentile(lat, 0.99)},
            {"succeeded", succeeded},
            {"failed", failed},
            {"request_errors", errors},
            {"lost", lost},
            {"crashes_survived", crashes},
            {"host_crashes", host_crashes},
            {"host_restarts", restarts},
            {"quarantines_released", released},
            {"timeouts", timeouts},
            {"daemon_alive_at_end", alive},
            {"daemon_exit", exit_code},
            {"peak_rss_kib", peak},
            {"rss_median_q2_kib", q2},
            {"rss_median_q4_kib", q4},
            {"rss_peak_q2_kib", q2_peak},
            {"rss_peak_q4_kib", q4_peak},
            {"rss_flat", flat}};
  json series = json::array();  // one sample a second: [seconds, KiB]
  for (size_t i = 0; i < rss.size(); i += 4) series.push_back({rss[i].first, rss[i].second});
  j["rss_kib_series"] = series;
  std::printf(
      "soak: %d clients, %.0fs: %zu tasks (%.0f/s), p50 %.1f ms, p99 %.1f ms; %ld succeeded, "
      "%ld failed, %ld request errors\n"
      "  lost %ld; crashes survived %ld (%ld plugin hosts died, %ld restarts, %ld quarantines "
      "released), timeouts %ld; daemon %s, exit %d\n"
      "  cortexd RSS: steady %ld -> %ld KiB (median of the 2nd -> last quarter: %s), peak %ld KiB "
      "during retrains\n",
      o.clients, elapsed, acked.size(), acked.size() / elapsed, Percentile(lat, 0.5),
      Percentile(lat, 0.99), succeeded, failed, errors, lost, crashes, host_crashes, restarts,
      released, timeouts, alive ? "alive" : "DEAD", exit_code, q2, q4, flat ? "flat" : "GROWING",
      peak);
  WriteJson(o.json_out, j);
  return lost == 0 && alive && exit_code == 0 && flat ? 0 : 1;
}

}  // namespace cortex::bench
