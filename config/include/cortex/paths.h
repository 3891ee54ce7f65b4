// Default locations (XDG base directories) shared by cortexd and cortexctl.
#pragma once

#include <string>

namespace cortex {

std::string DataDir();            // $XDG_DATA_HOME/cortex, else ~/.local/share/cortex
std::string RuntimeDir();         // $XDG_RUNTIME_DIR/cortex, else /tmp/cortex-$UID
std::string DefaultSocketPath();  // $CORTEX_SOCKET, else RuntimeDir()/cortexd.sock
std::string DefaultStorePath();
std::string DefaultPluginDir();
// The config file cortexd reads without --config: $XDG_CONFIG_HOME/cortex/cortex.yaml
// (else ~/.config/cortex/cortex.yaml), then /etc/cortex/cortex.yaml; "" when neither
// exists (the embedded defaults then).
std::string DefaultConfigFile();
// Cortex's version ("0.1.0"), from the build.
const char* CortexVersion();

}  // namespace cortex
