// The `security` expert: scans a repository given as tag repo=PATH for committed private
// keys and access tokens, and for unsafe permissions (world-writable, setuid/setgid,
// readable key files). Findings are reported with file:line and a redacted match.
#include <re2/re2.h>
#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>

#include "../common/expert_util.h"
#include "cortex/plugin_sdk.hpp"

namespace {

namespace fs = std::filesystem;

const char* const kKeywords[] = {"security",    "secret", "secrets",     "leak",
                                 "credential",  "token",  "private key", "vulnerability",
                                 "permissions", "audit",  "cve",         nullptr};
const char* const kExamples[] = {
    "scan the repository for leaked secrets", "check for committed private keys or api tokens",
    "audit file permissions for security problems", "security review before release", nullptr};
const char* const kConfigKeys[] = {nullptr};
const cortex_manifest kManifest = {
    "security",
    "1.0.0",
    "Scans a repository (tag repo=PATH) for committed secrets and unsafe file permissions.",
    kKeywords,
    kExamples,
    kConfigKeys,
    2,
    300000,
    0};

struct Pattern {
  const char* kind;
  const char* prefilter;  // cheap substring test before the regex
  std::unique_ptr<RE2> re;  // linear-time: a minified megabyte line cannot blow the stack
};

const std::vector<Pattern>& Patterns() {
  static const std::vector<Pattern> k = [] {
    std::vector<Pattern> v;
    auto add = [&](const char* kind, const char* pre, const char* re) {
      v.push_back({kind, pre, std::make_unique<RE2>(re)});
    };
    add("private key", "PRIVATE KEY",
        R"(-----BEGIN ((RSA|EC|DSA|OPENSSH|ENCRYPTED|PGP) )?PRIVATE KEY( BLOCK)?-----)");
    add("AWS access key id", "AKIA", R"(\b(AKIA|ASIA)[0-9A-Z]{16}\b)");
    add("GitHub token", "gh", R"(\bgh[pousr]_[A-Za-z0-9]{36,}\b)");
    add("GitHub fine-grained token", "github_pat_", R"(\bgithub_pat_[A-Za-z0-9_]{60,}\b)");
    add("Slack token", "xox", R"(\bxox[abprs]-[A-Za-z0-9-]{10,}\b)");
    add("Google API key", "AIza", R"(\bAIza[0-9A-Za-z_\-]{35}\b)");
    add("Stripe live key", "_live_", R"(\b[sr]k_live_[0-9A-Za-z]{24,}\b)");
    return v;
  }();
  return k;
}

bool KeyLikeName(const std::string& name) {
  static const std::set<std::string> names = {"id_rsa", "id_dsa",  "id_ecdsa", "id_ed25519", ".env",
                                              ".npmrc", ".pypirc", ".netrc",   "credentials"};
  if (names.count(name)) return true;
  for (const char* ext : {".pem", ".key", ".p12", ".pfx", ".keystore", ".jks"})
    if (name.size() > std::strlen(ext) &&
        name.compare(name.size() - std::strlen(ext), std::string::npos, ext) == 0)
      return true;
  return false;
}

std::string Redact(const std::string& s) {
  if (s.size() <= 8) return std::string(s.size(), '*');
  return s.substr(0, 6) + std::string(std::min<size_t>(s.size() - 6, 12), '*');
}

struct Finding {
  std::string severity, kind, where, detail;
};

class SecurityExpert {
 public:
  static SecurityExpert* Create(const nlohmann::json&, std::string*) {
    return new SecurityExpert();
  }

  cortex_result Execute(const cortex_task& task, const cortex_host& host) {
    cortex::experts::TaskRepo tr;
    cortex_result stop;
    if (!cortex::experts::ListTaskRepo(task, host, 500000, &tr, &stop)) return stop;
    auto cancelled = [&host] { return host.cancelled(host.ctx) != 0; };
    const std::string& repo = tr.path;
    const std::vector<std::string>& files = tr.files;
    const std::string& how = tr.how;
    std::vector<Finding> findings;
    std::set<std::string> dirs_checked;
    long scanned = 0;
    for (const auto& rel : files) {
      if (cancelled()) return cortex::sdk::Result(CORTEX_OUTCOME_TIMEOUT, 0, "cancelled");
      fs::path p = fs::path(repo) / rel;
      struct stat st {};
      if (::lstat(p.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
      CheckMode(rel, st.st_mode, &findings);
      for (fs::path d = fs::path(rel).parent_path(); !d.empty(); d = d.parent_path()) {
        if (!dirs_checked.insert(d.string()).second) break;
        struct stat ds {};
        if (::lstat((fs::path(repo) / d).c_str(), &ds) == 0 && (ds.st_mode & S_IWOTH) &&
            !(ds.st_mode & S_ISVTX))
          findings.push_back({"medium", "world-writable directory", d.string() + "/",
                              "anyone on the machine can add or replace files here"});
      }
      if (st.st_size > (1 << 20)) continue;
      ++scanned;
      ScanContent(p, rel, &findings);
    }
    std::string out = "security scan of " + repo + ": " + std::to_string(files.size()) +
                      " files (" + how + "), " + std::to_string(scanned) +
                      " scanned for secrets, " + std::to_string(findings.size()) + " finding(s)\n";
    nlohmann::json js = {
        {"repo", repo}, {"files", files.size()}, {"findings", nlohmann::json::array()}};
    for (const auto& f : findings) {
      out += "  [" + f.severity + "] " + f.kind + " at " + f.where + ": " + f.detail + "\n";
      js["findings"].push_back(
          {{"severity", f.severity}, {"kind", f.kind}, {"where", f.where}, {"detail", f.detail}});
    }
    out += js.dump() + "\n";
    cortex::sdk::Write(host, out);
    return cortex::sdk::Result(CORTEX_OUTCOME_SUCCESS, 1.0);
  }

 private:
  static void CheckMode(const std::string& rel, mode_t mode, std::vector<Finding>* out) {
    char m[8];
    std::snprintf(m, sizeof m, "%04o", static_cast<unsigned>(mode & 07777));
    if (mode & S_IWOTH)
      out->push_back({"high", "world-writable file", rel,
                      std::string("mode ") + m + ": anyone can change it"});
    if (mode & (S_ISUID | S_ISGID))
      out->push_back({"high", "setuid/setgid file", rel, std::string("mode ") + m});
    std::string name = fs::path(rel).filename().string();
    if (KeyLikeName(name)) {
      out->push_back({"high", "credential file committed", rel,
                      "files like this should not be in version control"});
      if (mode & (S_IRGRP | S_IROTH))
        out->push_back({"medium", "readable credential file", rel,
                        std::string("mode ") + m + ": readable by group or others"});
    }
  }

  static void ScanContent(const fs::path& p, const std::string& rel, std::vector<Finding>* out) {
    std::ifstream in(p, std::ios::binary);
    std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (content.find('\0') != std::string::npos) return;  // binary
    bool any = false;
    for (const auto& pat : Patterns())
      any = any || content.find(pat.prefilter) != std::string::npos;
    if (!any) return;
    size_t line_no = 0, start = 0;
    while (start <= content.size()) {
      size_t end = content.find('\n', start);
      if (end == std::string::npos) end = content.size();
      ++line_no;
      std::string line = content.substr(start, end - start);
      for (const auto& pat : Patterns()) {
        if (line.find(pat.prefilter) == std::string::npos) continue;
        re2::StringPiece m;
        if (pat.re->Match(line, 0, line.size(), RE2::UNANCHORED, &m, 1))
          out->push_back({"critical", pat.kind, rel + ":" + std::to_string(line_no),
                          "matched " + Redact(std::string(m.data(), m.size()))});
      }
      start = end + 1;
    }
  }
};

}  // namespace

CORTEX_EXPORT_PLUGIN(SecurityExpert, &kManifest)
