// The C++ tests' tiny harness: EXPECT(cond) counts a failure and says where; run_tests() runs
// named tests, prints PASS/FAIL per test, and gives main() its exit code.
#pragma once

#include <cstdio>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace fastcap_test {

inline int failures = 0;

#define EXPECT(cond)                                                                      \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond);             \
      ++fastcap_test::failures;                                                           \
    }                                                                                     \
  } while (0)

inline int run_tests(const std::vector<std::pair<std::string, std::function<void()>>>& tests) {
  for (const auto& [name, fn] : tests) {
    const int before = failures;
    fn();
    std::printf("%s %s\n", failures == before ? "PASS" : "FAIL", name.c_str());
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace fastcap_test
