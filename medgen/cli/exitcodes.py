"""The exit codes of `medgen`, `medgen-server` and `medgen-client` (README "Exit codes"); which
error gets which code is decided in one place, ``medgen.cli.main.run_command``."""

DONE = 0
SOME_FILES_BAD = 1
USAGE_ERROR = 2
INPUT_ERROR = 3
FAILED = 4
REFUSED = 5
INTERRUPTED = 130
TERMINATED = 143

TABLE = f"""\
exit codes:
  {DONE:<3}  done
  {SOME_FILES_BAD:<3}  usable, but some files are bad (`medgen data check`, `medgen-client join --dry-run`)
  {USAGE_ERROR:<3}  usage error: a flag or argument the command line does not accept
  {INPUT_ERROR:<3}  config, data, certificate or key error (the message names the key or file)
  {FAILED:<3}  the federation or the deployment failed
  {REFUSED:<3}  refused: by the site's policy (the sites' policies, for a study too few serve), or the
       server refused this site
  {INTERRUPTED:<3}  interrupted (Ctrl-C); a run continues with --resume
  {TERMINATED:<3}  stopped by SIGTERM (systemctl stop, docker stop); a run continues with --resume
"""
