#pragma once
/// @file error_path.hpp
/// Module paths in error messages. A container (Sequential, C3, an InferenceChain, ...)
/// that runs a child inside `try` calls `rethrow_in_child` from its `catch (...)`: the
/// same exception type is thrown again with the child's path in front of the message, so
/// an error deep in a network names the path from the outermost container down to the
/// layer at fault:
///
///     Sequential[3] (C3) .m.0.cv1 (OREPA_1x1): input must be [N, 16, H, W], got [2, 32, 8, 8]
///
/// (layer 3 of the Sequential is a C3; its tensor path "m.0.cv1" leads to an OREPA_1x1).
/// The work is done in the handler only: a `try` costs nothing on the path that does not
/// throw.

#include <string>

#include "orepa/core/error.hpp"
#include "orepa/core/linkage.hpp"

#if OREPA_DEFINITIONS
#include <cctype>
#endif

namespace orepa::detail {

/// The message of an error `msg` thrown by child `child` (its name in `container`: an
/// index or a tensor path such as "m.0") of type `type`, as `container` reports it. A
/// child that is itself a container has already put its own path in front
/// ("C3[m.0] (Bottleneck) .cv1 (OREPA_1x1): ..."); that path is joined to this one. A
/// leaf's own "Type::function: " or "Type: " prefix is dropped, as the path names it.
OREPA_INLINE std::string child_error_message(const std::string& container, const std::string& child, const std::string& type,
                                             const std::string& msg);
#if OREPA_DEFINITIONS
OREPA_INLINE std::string child_error_message(const std::string& container, const std::string& child, const std::string& type,
                                             const std::string& msg) {
  const std::string head = container + "[" + child + "] (" + type + ")";
  auto starts = [&](std::size_t at, const std::string& s) { return msg.compare(at, s.size(), s) == 0; };
  if (starts(0, type + "[")) {  // "<type>[seg] (segtype): text" or "<type>[seg] (segtype) .path (leaf): text"
    const std::size_t seg = type.size() + 1, close = msg.find("] (", seg);
    const std::size_t type_end = close == std::string::npos ? close : msg.find(')', close + 3);
    if (type_end != std::string::npos) {
      const std::string segment = msg.substr(seg, close - seg), seg_type = msg.substr(close + 3, type_end - close - 3);
      if (starts(type_end + 1, ": ")) return head + " ." + segment + " (" + seg_type + ")" + msg.substr(type_end + 1);
      if (starts(type_end + 1, " .")) return head + " ." + segment + msg.substr(type_end + 2);
    }
  }
  std::size_t text = 0;
  if (starts(0, type + "::")) {  // "Type::function: text" (or "Type::function what: text", kept)
    std::size_t e = text = type.size() + 2;
    while (e < msg.size() && (std::isalnum(static_cast<unsigned char>(msg[e])) || msg[e] == '_')) ++e;
    if (e > text && starts(e, ": ")) text = e + 2;
  } else if (starts(0, type + ": ")) {
    text = type.size() + 2;
  }
  return head + ": " + msg.substr(text);
}
#endif  // OREPA_DEFINITIONS

/// Rethrows the exception being handled (call it only inside a `catch`) with the path of
/// child `child` of type `type` in `container` in front of its message (see
/// child_error_message), keeping its type; exceptions that are not orepa's pass unchanged.
[[noreturn]] OREPA_INLINE void rethrow_in_child(const std::string& container, const std::string& child,
                                                const std::string& type);
#if OREPA_DEFINITIONS
[[noreturn]] OREPA_INLINE void rethrow_in_child(const std::string& container, const std::string& child,
                                                const std::string& type) {
  auto msg = [&](const std::exception& e) { return child_error_message(container, child, type, e.what()); };
  try {
    throw;
  } catch (const shape_error& e) {
    throw shape_error(msg(e));
  } catch (const config_error& e) {
    throw config_error(msg(e));
  } catch (const state_error& e) {
    throw state_error(msg(e));
  } catch (const format_error& e) {
    throw format_error(msg(e));
  } catch (const engine_error& e) {
    throw engine_error(msg(e));
  } catch (const value_error& e) {
    throw value_error(msg(e));
  }
}
#endif  // OREPA_DEFINITIONS

/// Runs `f()`, a call of child `child` (an object with type_name()) called `name` in
/// `container`; an orepa exception from it is rethrown with the child's path.
template <class Child, class F>
auto in_child(const char* container, const char* name, const Child& child, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (...) {
    rethrow_in_child(container, name, child.type_name());
  }
}

/// The name of type `t` without namespaces and template arguments ("DeployedC3" for
/// `orepa::DeployedC3<float>`), for messages and printing.
OREPA_INLINE std::string short_type_name(const std::type_info& t);
#if OREPA_DEFINITIONS
OREPA_INLINE std::string short_type_name(const std::type_info& t) {
  std::string name = readable_type_name(t);
  name = name.substr(0, name.find('<'));
  const std::size_t colon = name.rfind("::");
  return colon == std::string::npos ? name : name.substr(colon + 2);
}
#endif  // OREPA_DEFINITIONS

}  // namespace orepa::detail
