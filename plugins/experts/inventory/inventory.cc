// The `inventory` expert: catalogs a repository given as tag repo=PATH — files and lines
// per language, build manifests, largest files — and reports it as text plus one JSON line.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>

#include "../common/expert_util.h"
#include "cortex/plugin_sdk.hpp"

namespace {

namespace fs = std::filesystem;

const char* const kKeywords[] = {"inventory",     "catalog",      "languages", "files",
                                 "lines of code", "build system", "manifest",  "dependencies",
                                 "structure",     "overview",     nullptr};
const char* const kExamples[] = {"what languages is this repository written in",
                                 "give me an overview of the project structure",
                                 "which build manifests and dependency files does it have",
                                 "count files and lines of code per language", nullptr};
const char* const kConfigKeys[] = {"max_files", nullptr};
const cortex_manifest kManifest = {
    "inventory",
    "1.0.0",
    "Catalogs a repository (tag repo=PATH): languages, files, lines, build manifests.",
    kKeywords,
    kExamples,
    kConfigKeys,
    4,
    120000,
    0};

const std::map<std::string, std::string>& Languages() {
  static const std::map<std::string, std::string> k = {{".c", "C"},
                                                       {".h", "C/C++ header"},
                                                       {".cc", "C++"},
                                                       {".cpp", "C++"},
                                                       {".cxx", "C++"},
                                                       {".hpp", "C++"},
                                                       {".hh", "C++"},
                                                       {".cu", "CUDA"},
                                                       {".cuh", "CUDA"},
                                                       {".rs", "Rust"},
                                                       {".go", "Go"},
                                                       {".py", "Python"},
                                                       {".js", "JavaScript"},
                                                       {".mjs", "JavaScript"},
                                                       {".cjs", "JavaScript"},
                                                       {".jsx", "JavaScript"},
                                                       {".ts", "TypeScript"},
                                                       {".tsx", "TypeScript"},
                                                       {".mts", "TypeScript"},
                                                       {".vue", "Vue"},
                                                       {".java", "Java"},
                                                       {".kt", "Kotlin"},
                                                       {".scala", "Scala"},
                                                       {".rb", "Ruby"},
                                                       {".php", "PHP"},
                                                       {".cs", "C#"},
                                                       {".swift", "Swift"},
                                                       {".m", "Objective-C"},
                                                       {".sh", "Shell"},
                                                       {".bash", "Shell"},
                                                       {".zsh", "Shell"},
                                                       {".pl", "Perl"},
                                                       {".lua", "Lua"},
                                                       {".r", "R"},
                                                       {".jl", "Julia"},
                                                       {".hs", "Haskell"},
                                                       {".ml", "OCaml"},
                                                       {".ex", "Elixir"},
                                                       {".exs", "Elixir"},
                                                       {".erl", "Erlang"},
                                                       {".clj", "Clojure"},
                                                       {".dart", "Dart"},
                                                       {".zig", "Zig"},
                                                       {".sql", "SQL"},
                                                       {".html", "HTML"},
                                                       {".css", "CSS"},
                                                       {".scss", "SCSS"},
                                                       {".md", "Markdown"},
                                                       {".rst", "reStructuredText"},
                                                       {".yaml", "YAML"},
                                                       {".yml", "YAML"},
                                                       {".json", "JSON"},
                                                       {".toml", "TOML"},
                                                       {".xml", "XML"},
                                                       {".cmake", "CMake"},
                                                       {".proto", "Protobuf"},
                                                       {".tsv", "TSV"},
                                                       {".csv", "CSV"}};
  return k;
}

const std::map<std::string, std::string>& Manifests() {
  static const std::map<std::string, std::string> k = {
      {"CMakeLists.txt", "CMake"},     {"Makefile", "Make"},
      {"meson.build", "Meson"},        {"package.json", "npm"},
      {"Cargo.toml", "Cargo"},         {"go.mod", "Go modules"},
      {"pyproject.toml", "Python"},    {"setup.py", "Python"},
      {"requirements.txt", "pip"},     {"pom.xml", "Maven"},
      {"build.gradle", "Gradle"},      {"build.gradle.kts", "Gradle"},
      {"Gemfile", "Bundler"},          {"composer.json", "Composer"},
      {"BUILD.bazel", "Bazel"},        {"WORKSPACE", "Bazel"},
      {"Dockerfile", "Docker"},        {"configure.ac", "Autotools"},
      {"pnpm-workspace.yaml", "pnpm"}, {"vcpkg.json", "vcpkg"},
      {"conanfile.txt", "Conan"},      {"mix.exs", "Mix"},
      {"deno.json", "Deno"},           {"flake.nix", "Nix"}};
  return k;
}

std::string Language(const fs::path& p) {
  std::string name = p.filename().string();
  if (name == "CMakeLists.txt") return "CMake";
  if (name == "Makefile" || name == "GNUmakefile") return "Make";
  if (name == "Dockerfile") return "Docker";
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  auto it = Languages().find(ext);
  return it == Languages().end() ? "" : it->second;
}

struct LangStats {
  long files = 0, lines = 0, bytes = 0;
};

class InventoryExpert {
 public:
  static InventoryExpert* Create(const nlohmann::json& s, std::string* err) {
    auto e = std::make_unique<InventoryExpert>();
    if (s.contains("max_files")) {
      if (!s["max_files"].is_string() && !s["max_files"].is_number()) {
        *err = "max_files: expected a number";
        return nullptr;
      }
      try {
        e->max_files_ = std::stoul(s["max_files"].is_string() ? s["max_files"].get<std::string>()
                                                              : s["max_files"].dump());
      } catch (...) {
        *err = "max_files: expected a positive number";
        return nullptr;
      }
    }
    return e.release();
  }

  cortex_result Execute(const cortex_task& task, const cortex_host& host) {
    cortex::experts::TaskRepo tr;
    cortex_result stop;
    if (!cortex::experts::ListTaskRepo(task, host, max_files_, &tr, &stop)) return stop;
    auto cancelled = [&host] { return host.cancelled(host.ctx) != 0; };
    const std::string& repo = tr.path;
    const std::vector<std::string>& files = tr.files;
    const std::string& how = tr.how;
    std::map<std::string, LangStats> langs;
    std::vector<std::pair<std::string, std::string>> manifests;
    std::vector<std::pair<long, std::string>> largest;
    long total_bytes = 0, total_lines = 0;
    for (const auto& rel : files) {
      if (cancelled()) return cortex::sdk::Result(CORTEX_OUTCOME_TIMEOUT, 0, "cancelled");
      fs::path p = fs::path(repo) / rel;
      std::error_code ec;
      long size = static_cast<long>(fs::file_size(p, ec));
      if (ec) continue;
      total_bytes += size;
      largest.emplace_back(size, rel);
      auto m = Manifests().find(p.filename().string());
      if (m != Manifests().end()) manifests.emplace_back(rel, m->second);
      std::string lang = Language(p);
      if (lang.empty()) lang = "other";
      LangStats& ls = langs[lang];
      ++ls.files;
      ls.bytes += size;
      if (size <= (2 << 20) && lang != "other") {
        std::ifstream in(p, std::ios::binary);
        long lines = static_cast<long>(
            std::count(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>(), '\n'));
        ls.lines += lines;
        total_lines += lines;
      }
    }
    std::vector<std::pair<std::string, LangStats>> sorted(langs.begin(), langs.end());
    std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) {
      return a.second.lines != b.second.lines ? a.second.lines > b.second.lines
                                              : a.second.files > b.second.files;
    });
    std::sort(largest.rbegin(), largest.rend());
    if (largest.size() > 5) largest.resize(5);

    std::string out = "inventory of " + repo + ": " + std::to_string(files.size()) + " files (" +
                      how + "), " + std::to_string(total_lines) + " lines, " +
                      std::to_string(total_bytes / 1024) + " KiB\n\nlanguages:\n";
    nlohmann::json js = {{"repo", repo},
                         {"files", files.size()},
                         {"lines", total_lines},
                         {"bytes", total_bytes},
                         {"listing", how}};
    for (const auto& [lang, st] : sorted) {
      char line[160];
      std::snprintf(line, sizeof line, "  %-18s %6ld files %9ld lines\n", lang.c_str(), st.files,
                    st.lines);
      out += line;
      js["languages"][lang] = {{"files", st.files}, {"lines", st.lines}, {"bytes", st.bytes}};
    }
    out += "\nbuild manifests:" + std::string(manifests.empty() ? " none\n" : "\n");
    for (const auto& [rel, kind] : manifests) {
      out += "  " + rel + " (" + kind + ")\n";
      js["manifests"].push_back({{"path", rel}, {"kind", kind}});
    }
    out += "\nlargest files:\n";
    for (const auto& [size, rel] : largest)
      out += "  " + rel + " (" + std::to_string(size / 1024) + " KiB)\n";
    out += js.dump() + "\n";
    cortex::sdk::Write(host, out);
    return cortex::sdk::Result(CORTEX_OUTCOME_SUCCESS, files.empty() ? 0.5 : 1.0);
  }

 private:
  size_t max_files_ = 200000;
};

}  // namespace

CORTEX_EXPORT_PLUGIN(InventoryExpert, &kManifest)
