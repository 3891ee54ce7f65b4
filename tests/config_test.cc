#include <fmt/format.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <regex>

#include "cortex/config.h"
#include "cortex/log.h"
#include "cortex/rules.h"

namespace cortex {
namespace {

TEST(ConfigTest, EmbeddedDefaultsParseAndResolvePaths) {
  Result<Config> c = LoadConfigString(EmbeddedDefaultsYaml(), "<embedded defaults>");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->router.backend, "auto");
  EXPECT_DOUBLE_EQ(c->router.exploration, 0.05);
  EXPECT_EQ(c->training.interval_s, 600);
  EXPECT_GE(c->rules.size(), 2u);
  Config d = DefaultConfig();
  EXPECT_FALSE(d.daemon.socket.empty());
  EXPECT_NE(d.store.path.find("cortex.db"), std::string::npos);
}

TEST(ConfigTest, FullExampleFromSpecParses) {
  const char* yaml = R"(daemon:   { socket: /tmp/x.sock, workers: 4 }
store:    { path: /tmp/x.db }
plugins:  { dir: /tmp/p, watch: true }
router:
  backend: auto
  exploration: 0.05
  load_bias: 0.2
  max_attempts: 2
training:
  interval: 10m
  min_new_outcomes: 200
rules:
  - name: security-terms
    match: ["cve", "vulnerab", "xss", "injection"]
    expert: security
    boost: 0.3
  - name: compliance
    match: ["/\\bgdpr\\b/"]
    expert: security
    force: true
experts:
  - name: cicd
    plugin: command
    run: ["ctest", "--test-dir", "build"]
    keywords: ["ci", "build", "pipeline", "release"]
    timeout: 10m
)";
  Result<Config> c = LoadConfigString(yaml, "spec.yaml");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_EQ(c->experts.size(), 1u);
  EXPECT_EQ(c->experts[0].plugin, "command");
  EXPECT_EQ(c->experts[0].timeout_s.value(), 600);
  EXPECT_EQ(c->experts[0].settings["run"].size(), 3u);
  EXPECT_EQ(c->experts[0].key_lines.at("run"), 24);
  EXPECT_TRUE(c->rules[1].force);
  EXPECT_EQ(c->daemon.socket, "/tmp/x.sock");
}

struct BadCase {
  const char* yaml;
  const char* expect;  // substring of the error, which always starts with file:line
};

class ConfigErrorTest : public ::testing::TestWithParam<BadCase> {};

TEST_P(ConfigErrorTest, NamesFileLineAndKey) {
  Result<Config> c = LoadConfigString(GetParam().yaml, "bad.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), Status::Code::kInvalidArgument);
  EXPECT_NE(c.status().message().find(GetParam().expect), std::string::npos)
      << c.status().message();
  EXPECT_EQ(c.status().message().rfind("bad.yaml:", 0), 0u) << c.status().message();
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ConfigErrorTest,
    ::testing::Values(
        BadCase{"daemon:\n  workerz: 4\n", "bad.yaml:2: daemon.workerz: unknown key"},
        BadCase{"daemon:\n  workers: many\n", "bad.yaml:2: daemon.workers: expected an integer"},
        // Not YAML 1.1's hexadecimal (nor octal: 010 is ten, below).
        BadCase{"training:\n  keep_versions: 0x10\n",
                "bad.yaml:2: training.keep_versions: expected an integer (decimal digits), got "
                "'0x10'"},
        BadCase{"router:\n  exploration: 2\n", "router.exploration: must be between 0 and 1"},
        BadCase{"router:\n  backend: tpu\n", "router.backend: must be auto, cpu or cuda"},
        BadCase{"training:\n  interval: soon\n", "bad.yaml:2: training.interval: not a duration"},
        BadCase{"rules:\n  - name: r\n    match: cve\n    expert: s\n    boost: 1\n",
                "bad.yaml:3: rules[0].match: expected a list"},
        BadCase{"rules:\n  - name: r\n    match: [x]\n    boost: 1\n",
                "rules[0].expert: is required"},
        BadCase{"rules:\n  - name: r\n    match: [x]\n    expert: e\n", "needs a boost, or force"},
        BadCase{"experts:\n  - name: A B\n    plugin: command\n", "experts[0].name: must be"},
        BadCase{"experts:\n  - name: a\n    plugin: command\n  - name: a\n    plugin: command\n",
                "bad.yaml:4: experts[1].name: duplicate"},
        BadCase{"experts:\n  - name: a\n    plugin: command\n    timeout: -3s\n",
                "experts[0].timeout"},
        BadCase{"nonsense: 1\n", "bad.yaml:1: nonsense: unknown key"},
        BadCase{"plugins: {dir: /a}\nplugins: {bundled: false}\n",
                "bad.yaml:2: plugins: duplicate key"},
        BadCase{"experts:\n  - name: a\n    plugin: x\n    run: [a]\n    run: [b]\n",
                "bad.yaml:5: experts[0].run: duplicate key"},
        BadCase{"plugins:\n  isolation: sandbox\n",
                "bad.yaml:2: plugins.isolation: must be process or in-process"},
        BadCase{"plugins:\n  memory_limit: lots\n", "bad.yaml:2: plugins.memory_limit: not a size"},
        BadCase{"plugins:\n  memory_limit: 1MiB\n", "plugins.memory_limit: must be 0"},
        BadCase{"plugins:\n  quarantine_after: 0\n", "plugins.quarantine_after: must be between"},
        BadCase{"router:\n  health_bias: -1\n", "router.health_bias: must be between"},
        BadCase{"daemon: [1, 2\n", "YAML syntax error"}));

TEST(ConfigTest, PluginSupervisionSettings) {
  Config d = DefaultConfig();
  EXPECT_EQ(d.plugins.isolation, "process") << "plugins run out of process unless asked";
  EXPECT_EQ(d.plugins.memory_limit, size_t{1} << 30);
  Result<Config> c = LoadConfigString(
      "plugins: {isolation: in-process, memory_limit: 256MiB, quarantine_after: 2, "
      "restart_backoff: 1s}\n",
      "x");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->plugins.isolation, "in-process");
  EXPECT_EQ(c->plugins.memory_limit, size_t{256} << 20);
  EXPECT_EQ(c->plugins.quarantine_after, 2);
  EXPECT_DOUBLE_EQ(c->plugins.restart_backoff_s, 1.0);
  EXPECT_EQ(ParseSize("0").value(), 0u);
  EXPECT_EQ(ParseSize("2G").value(), size_t{2} << 30);
  EXPECT_EQ(ParseSize("64KiB").value(), size_t{64} << 10);
  EXPECT_FALSE(ParseSize("-1MiB").ok());
  EXPECT_FALSE(ParseSize("12 parsecs").ok());
}

// Integers are decimal, as YAML 1.2 reads them (yaml-cpp alone reads 010 as 8).
TEST(ConfigTest, IntegersAreDecimal) {
  Result<Config> c = LoadConfigString(
      "training: {checkpoint_every: 010, keep_versions: +7, feedback_per_hour: '50'}\n", "x");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->training.checkpoint_every, 10);
  EXPECT_EQ(c->training.keep_versions, 7);
  EXPECT_EQ(c->training.feedback_per_hour, 50);
  EXPECT_FALSE(LoadConfigString("training: {checkpoint_every: 1e3}\n", "x").ok());
  EXPECT_FALSE(LoadConfigString("training: {checkpoint_every: ' 5'}\n", "x").ok());
}

TEST(ConfigTest, MissingFileIsNotFound) {
  Result<Config> c = LoadConfigFile("/nonexistent/cortex.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), Status::Code::kNotFound);
}

TEST(StatusTest, SplitLinesUndoesJoinLines) {
  const std::vector<std::string> lines = {"a.yaml:1: x", "", "a.yaml:3: y"};
  EXPECT_EQ(SplitLines(JoinLines(lines)), lines);
  EXPECT_EQ(SplitLines(""), std::vector<std::string>{""});
}

// What a retry loop says every second (a heartbeat failing while the database is down) is
// written once per window with how often it came since; everything else is always written.
// Bytes that are not UTF-8 reach no log raw: a lone 0x85 or 0x9b is NEL or CSI to a
// terminal (the outside attack's plugin wrote them); well-formed text stays as it is.
TEST(LogTest, PrintableEscapesWhatIsNotUtf8AndKeepsWhatIs) {
  EXPECT_EQ(Printable("a\x85"
                      "b\x9b[31m\xff\xc3"),
            "a\\x85b\\x9b[31m\\xff\\xc3");
  EXPECT_EQ(Printable("\xed\xa0\x80"), "\\xed\\xa0\\x80");  // a surrogate
  EXPECT_EQ(Printable("\xc0\xaf"), "\\xc0\\xaf");           // overlong '/'
  const std::string ok = "caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80";
  EXPECT_EQ(Printable(ok), ok);
  EXPECT_EQ(Printable("\xc2\x85"), "\\u0085");  // C1 as UTF-8, as before
}

TEST(LogTest, ARetryLoopsWarningIsCountedNotRepeated) {
  char tmpl[] = "/tmp/cortex-log-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string file = std::string(tmpl) + "/log";
  ASSERT_TRUE(SetLogFile(file));
  SetLogRepeatWindow(1.0);
  for (int i = 0; i < 4; ++i) LogWarnRepeating("database down: {}", "no socket");
  LogWarnRepeating("something else");
  for (int i = 0; i < 2; ++i) LogWarn("reload refused");
  for (int i = 0; i < 2; ++i) LogInfo("task done");
  usleep(1200 * 1000);
  LogWarnRepeating("database down: {}", "no socket");
  SetLogRepeatWindow(60);
  (void)SetLogFile("/dev/null");
  std::ifstream in(file);
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);) lines.push_back(l.substr(l.find(": ") + 2));
  ASSERT_EQ(lines.size(), 7u);
  const std::vector<std::string> first(lines.begin(), lines.end() - 1);
  const std::vector<std::string> want = {
      "database down: no socket", "something else", "reload refused",
      "reload refused",           "task done",      "task done"};
  EXPECT_EQ(first, want);
  EXPECT_TRUE(std::regex_match(
      lines.back(),
      std::regex(R"(database down: no socket \(and 3 more times since \d\d:\d\d:\d\d\))")))
      << lines.back();
  std::filesystem::remove_all(tmpl);
}

TEST(ConfigTest, Durations) {
  EXPECT_DOUBLE_EQ(ParseDuration("10m").value(), 600);
  EXPECT_DOUBLE_EQ(ParseDuration("250ms").value(), 0.25);
  EXPECT_DOUBLE_EQ(ParseDuration("2h").value(), 7200);
  EXPECT_DOUBLE_EQ(ParseDuration("1.5").value(), 1.5);
  EXPECT_FALSE(ParseDuration("5 parsecs").ok());
  EXPECT_FALSE(ParseDuration("").ok());
  for (const char* odd : {"0x10m", "infs", "nan", "1e3s", "+5m"})
    EXPECT_FALSE(ParseDuration(odd).ok()) << odd;
}

TEST(RulesTest, BadRegexNamesTheRuleAndLine) {
  Result<Config> c = LoadConfigString(
      "rules:\n  - name: r1\n    match: [\"/([a-z/\"]\n    expert: e\n    boost: 1\n", "r.yaml");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  Result<RuleSet> rs = RuleSet::Compile(c->rules, c->source);
  ASSERT_FALSE(rs.ok());
  // The line is the pattern's own (line 3), not the rule's (line 2).
  EXPECT_NE(rs.status().message().find("r.yaml:3: rules.r1.match: bad regular expression"),
            std::string::npos)
      << rs.status().message();
}

// Linear time is no comfort when the pattern itself is huge: an attacker-sized counted
// repetition made routing one task take seconds. Refused at compile (so --check-config
// and a start), naming the size and the limit; an ordinary pattern stays far below it.
TEST(ConfigTest, AHugeRegexRuleIsRefused) {
  std::string alts;
  for (int i = 0; i < 60; ++i) alts += (i ? "|" : "") + fmt::format("[a-z0-9 ]{{{}}}q", 200 + i);
  Result<Config> c = LoadConfigString(
      "rules:\n  - name: big\n    match: [\"/(" + alts + ")zz9/\"]\n    expert: e\n    boost: 1\n",
      "r.yaml");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  Result<RuleSet> rs = RuleSet::Compile(c->rules, c->source);
  ASSERT_FALSE(rs.ok());
  EXPECT_NE(rs.status().message().find("is too large for a rule"), std::string::npos)
      << rs.status().message();
  EXPECT_NE(rs.status().message().find("the limit is 2000"), std::string::npos);
  c = LoadConfigString(
      "rules:\n  - name: ok\n    match: [\"/(fix|bug)(.|[ ])*timeout/\", \"/[a-z0-9]{3,80}x/\"]\n"
      "    expert: e\n    boost: 1\n",
      "r.yaml");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_TRUE(RuleSet::Compile(c->rules, c->source).ok());
}

}  // namespace
}  // namespace cortex
