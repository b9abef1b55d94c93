#pragma once
/// @file output_path.hpp
/// Where a file may be written without destroying anything it should not: the check every
/// tool runs on its output path before doing any work, and SafetensorsWriter::write runs
/// again before replacing the file.
///
/// An output may be a regular file (replaced atomically) or a path that does not exist
/// yet. A symbolic link is followed: its target is replaced when it is a regular file (the
/// link stays), and refused otherwise (dangling, or pointing at a directory or a special
/// file). A directory, FIFO, socket or device is refused, so `--output /dev/null` never
/// turns the system's /dev/null into a regular file. check_output_path also refuses an
/// output that is the same file as one of the inputs (same device and inode, which is
/// how it sees through symbolic links, hard links and different spellings of a path).

#include <string>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/linkage.hpp"

#if OREPA_DEFINITIONS
#include <sys/stat.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#endif

namespace orepa::io {

/// A file a tool reads or writes, named for messages: its role (a flag such as
/// "--weights", or "IN") and its path.
struct NamedPath {
  std::string role;  ///< how the user gave it ("--output", "OUT", ...)
  std::string path;  ///< the path as given
};

/// The file writing `out` replaces: `out.path` itself when it is a regular file or does not
/// exist yet, the fully resolved target of a symbolic link whose target is a regular file.
/// Throws config_error naming the role and path for a directory, a FIFO, a socket, a
/// device, a dangling link or a link to any of those. Nothing is opened (opening a FIFO
/// would block).
OREPA_INLINE std::string output_target(const NamedPath& out);
#if OREPA_DEFINITIONS
namespace detail {
inline const char* file_kind(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a FIFO (named pipe)";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISSOCK(m)) return "a socket";
  return "not a regular file";
}
}  // namespace detail

OREPA_INLINE std::string output_target(const NamedPath& out) {
  const std::string who = orepa::detail::cat(out.role, " '", out.path, "'");
  if (out.path.empty()) throw config_error(out.role + ": the output path is empty");
  struct stat st {};
  if (::lstat(out.path.c_str(), &st) != 0) return out.path;  // absent (or unreachable: writing reports why)
  if (S_ISREG(st.st_mode)) return out.path;
  if (!S_ISLNK(st.st_mode))
    throw config_error(orepa::detail::cat(who, " is ", detail::file_kind(st.st_mode),
                                          "; outputs are written to regular files only"));
  const std::unique_ptr<char, decltype(&std::free)> real(::realpath(out.path.c_str(), nullptr), &std::free);
  if (!real)
    throw config_error(orepa::detail::cat(who, " is a symbolic link whose target cannot be resolved (",
                                          std::strerror(errno), "); give the target's own path"));
  if (::stat(real.get(), &st) != 0 || !S_ISREG(st.st_mode))
    throw config_error(orepa::detail::cat(who, " is a symbolic link to '", real.get(), "', which is ",
                                          detail::file_kind(st.st_mode), "; outputs are written to regular files only"));
  return real.get();
}
#endif  // OREPA_DEFINITIONS

/// output_target(out), after checking that `out` is none of `inputs`: an existing output
/// with the device and inode of an existing input is refused with config_error naming
/// both (however the two paths are spelled or linked). Inputs that do not exist are
/// skipped (opening them reports that).
OREPA_INLINE std::string check_output_path(const NamedPath& out, const std::vector<NamedPath>& inputs);
#if OREPA_DEFINITIONS
OREPA_INLINE std::string check_output_path(const NamedPath& out, const std::vector<NamedPath>& inputs) {
  const std::string target = output_target(out);
  struct stat o {};
  if (::stat(target.c_str(), &o) != 0) return target;
  for (const auto& in : inputs) {
    struct stat i {};
    if (in.path.empty() || ::stat(in.path.c_str(), &i) != 0) continue;
    if (i.st_dev != o.st_dev || i.st_ino != o.st_ino) continue;
    const std::string how = target != out.path   ? " (the symbolic link's target '" + target + "')"
                            : in.path != out.path ? std::string(" (same device and inode: a hard link or another path)")
                                                  : std::string();
    throw config_error(orepa::detail::cat(out.role, " '", out.path, "' is the same file as ", in.role, " '", in.path,
                                          "'", how, ": writing it would destroy that input; choose another output path"));
  }
  return target;
}
#endif  // OREPA_DEFINITIONS

}  // namespace orepa::io
