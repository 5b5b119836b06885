// Test helper: runs `tandem` daemons as real child processes, waits for the one-line "ready"
// announcement and parses the bound addresses from it. Children are killed when the handle
// goes away, so a failing test leaves nothing behind.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <sstream>
#include <string>
#include <vector>

extern char** environ;

namespace tandem::testing_util {

class TandemProcess {
 public:
  // Starts `tandem args...`; stderr goes to `log_path`.
  TandemProcess(std::vector<std::string> args, const std::string& log_path)
      : log_path_(log_path) {
    int fds[2];
    if (pipe(fds) != 0) return;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
    posix_spawn_file_actions_addclose(&fa, fds[0]);
    posix_spawn_file_actions_addopen(&fa, 2, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    args.insert(args.begin(), TANDEM_BINARY);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (posix_spawn(&pid_, TANDEM_BINARY, &fa, nullptr, argv.data(), environ) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&fa);
    close(fds[1]);
    out_fd_ = fds[0];
  }
  ~TandemProcess() {
    if (pid_ > 0 && !exited_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (out_fd_ >= 0) close(out_fd_);
  }
  TandemProcess(const TandemProcess&) = delete;
  TandemProcess& operator=(const TandemProcess&) = delete;

  // Reads stdout until the "ready" line (true) or the timeout / the child's exit (false).
  bool WaitReady(std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    std::string buf;
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd p{out_fd_, POLLIN, 0};
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (poll(&p, 1, static_cast<int>(std::max<int64_t>(1, left.count()))) <= 0) continue;
      char c[512];
      const ssize_t n = read(out_fd_, c, sizeof(c));
      if (n <= 0) return false;
      buf.append(c, static_cast<size_t>(n));
      size_t nl;
      while ((nl = buf.find('\n')) != std::string::npos) {
        const std::string line = buf.substr(0, nl);
        buf.erase(0, nl + 1);
        if (line.find(" ready ") != std::string::npos) {
          std::istringstream ss(line);
          std::string tok;
          while (ss >> tok) {
            const size_t eq = tok.find('=');
            if (eq != std::string::npos) fields_[tok.substr(0, eq)] = tok.substr(eq + 1);
          }
          return true;
        }
      }
    }
    return false;
  }

  std::string field(const std::string& key) const {
    auto it = fields_.find(key);
    return it == fields_.end() ? "" : it->second;
  }
  pid_t pid() const { return pid_; }

  void Signal(int sig) {
    if (pid_ > 0 && !exited_) kill(pid_, sig);
  }
  // Waits for the exit; returns the exit code (or 128 + signal), -1 on timeout.
  int Wait(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!exited_) {
      int status = 0;
      const pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        exited_ = true;
        code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        break;
      }
      if (std::chrono::steady_clock::now() >= deadline) return -1;
      // A child's exit has no pollable handle here; a short bounded wait between checks.
      usleep(10000);
    }
    return code_;
  }
  void KillNow() {
    Signal(SIGKILL);
    Wait(std::chrono::seconds(10));
  }
  const std::string& log_path() const { return log_path_; }

 private:
  pid_t pid_ = -1;
  int out_fd_ = -1;
  bool exited_ = false;
  int code_ = -1;
  std::string log_path_;
  std::map<std::string, std::string> fields_;
};

}  // namespace tandem::testing_util
