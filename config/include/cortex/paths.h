// Default locations (XDG base directories) shared by cortexd and cortexctl.
#pragma once

#include <string>

namespace cortex {

std::string DataDir();            // $XDG_DATA_HOME/cortex, else ~/.local/share/cortex
std::string RuntimeDir();         // $XDG_RUNTIME_DIR/cortex, else /tmp/cortex-$UID
std::string DefaultSocketPath();  // $CORTEX_SOCKET, else RuntimeDir()/cortexd.sock
std::string DefaultStorePath();
std::string DefaultPluginDir();

}  // namespace cortex
