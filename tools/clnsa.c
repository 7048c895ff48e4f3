/* clnsa: the command-line tool of the library. One binary, one subcommand per file:
 *   devices  (cmd_devices.c)  list OpenCL devices and which one is the default
 *   run      (cmd_run.c)      one forward pass on .npy inputs
 *   demo     (cmd_demo.c)     time NSA against dense attention and check a slice
 *   bench    (cmd_bench.c)    time every stage over a sweep of shapes */
#include <string.h>

#include "cli.h"

typedef struct command {
  const char *name;
  const char *summary;
  int (*run)(int argc, char **argv);
  void (*usage)(FILE *f);
} command;

static const command COMMANDS[] = {
    {"devices", "list OpenCL platforms and devices, and the default one", cmd_devices,
     usage_devices},
    {"run", "run the NSA forward on .npy inputs and write the output as .npy", cmd_run, usage_run},
    {"demo", "time NSA against dense attention on random inputs and check the result", cmd_demo,
     usage_demo},
    {"bench", "time each stage, forward, backward and dense attention over a sweep", cmd_bench,
     usage_bench},
};
#define NCOMMANDS (sizeof COMMANDS / sizeof COMMANDS[0])

static void usage(FILE *f) {
  fprintf(f,
          "clnsa %s: Native Sparse Attention on any OpenCL device\n\n"
          "usage: clnsa <command> [options]\n"
          "       clnsa help [command] | clnsa --help | clnsa --version\n\n"
          "commands:\n",
          CLNSA_VERSION_STRING);
  for (size_t i = 0; i < NCOMMANDS; i++)
    fprintf(f, "  %-8s %s\n", COMMANDS[i].name, COMMANDS[i].summary);
  fprintf(f,
          "\nThe device is chosen by --device SPEC, else the environment variable\n"
          "CLNSA_DEVICE, else the first GPU, else the first device. SPEC is an index\n"
          "from `clnsa devices` or a case-insensitive part of \"platform / device\".\n"
          "Exit status: 0 success, 1 failure, 2 usage error.\n");
}

static const command *find_command(const char *name) {
  for (size_t i = 0; i < NCOMMANDS; i++)
    if (strcmp(name, COMMANDS[i].name) == 0) return &COMMANDS[i];
  return NULL;
}

static int help(int argc, char **argv) {
  if (argc < 2) {
    usage(stdout);
    return 0;
  }
  const command *c = find_command(argv[1]);
  if (!c) {
    fprintf(stderr, "clnsa help: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return CLI_EXIT_USAGE;
  }
  c->usage(stdout);
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    usage(stderr);
    return CLI_EXIT_USAGE;
  }
  const char *name = argv[1];
  if (strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0 || strcmp(name, "help") == 0)
    return help(argc - 1, argv + 1);
  if (strcmp(name, "--version") == 0 || strcmp(name, "version") == 0) {
    printf("clnsa %s\n", CLNSA_VERSION_STRING);
    return 0;
  }
  const command *c = find_command(name);
  if (!c) {
    fprintf(stderr, "clnsa: unknown command '%s'\n\n", name);
    usage(stderr);
    return CLI_EXIT_USAGE;
  }
  return c->run(argc - 1, argv + 1);
}
