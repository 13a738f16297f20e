#!/usr/bin/python3
"""The CNI side of a container runtime, as the CNI spec describes it, for the tests and the demo.

Usage: cni.py add CONFLIST NETNS CONTAINER_ID IFNAME CNI_PATH STATE [RUNTIME_CONFIG]
       cni.py del CONFLIST NETNS CONTAINER_ID IFNAME CNI_PATH STATE

ADD runs each plugin of the configuration list in order, with CNI_COMMAND=ADD, CNI_NETNS,
CNI_IFNAME, CNI_CONTAINERID and CNI_PATH set and the plugin's configuration (the list's name and
cniVersion added, and the previous plugin's result as prevResult) on stdin; prints the last
result and keeps it in STATE. DEL runs them in reverse order with that result as prevResult,
then removes STATE. A plugin that fails stops the run: its error is printed, exit status 1.

RUNTIME_CONFIG is a JSON object of the runtime's dynamic settings by capability, e.g.
{"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]} for a pod's
hostPorts. As the spec's capability convention says, a plugin gets, as "runtimeConfig", those
keys its "capabilities" enable; ADD keeps them beside STATE for DEL.
"""
import json
import os
import subprocess
import sys


def find(plugin, cni_path):
    for d in cni_path.split(":"):
        p = os.path.join(d, plugin)
        if os.access(p, os.X_OK):
            return p
    sys.exit(f"plugin {plugin!r} not found in CNI_PATH {cni_path}")


def run(conflist, plugin, command, env, prev, runtime):
    conf = dict(plugin)
    conf["name"] = conflist["name"]
    conf["cniVersion"] = conflist["cniVersion"]
    caps = plugin.get("capabilities", {})
    granted = {k: v for k, v in runtime.items() if caps.get(k)}
    if granted:
        conf["runtimeConfig"] = granted
    if prev is not None:
        conf["prevResult"] = prev
    p = subprocess.run(
        [find(plugin["type"], env["CNI_PATH"])],
        input=json.dumps(conf).encode(),
        env=env,
        capture_output=True,
    )
    if p.returncode != 0:
        sys.exit(f"{command} {plugin['type']} failed: {p.stdout.decode()} {p.stderr.decode()}")
    out = p.stdout.decode().strip()
    return json.loads(out) if out else prev


def main():
    command, conflist_path, netns, cid, ifname, cni_path, state = sys.argv[1:8]
    runtime_path = state + ".runtime"
    with open(conflist_path) as f:
        conflist = json.load(f)
    env = dict(os.environ)
    env.update(
        CNI_COMMAND=command.upper(),
        CNI_NETNS=netns,
        CNI_CONTAINERID=cid,
        CNI_IFNAME=ifname,
        CNI_PATH=cni_path,
    )
    if command == "add":
        runtime = json.loads(sys.argv[8]) if len(sys.argv) > 8 else {}
        with open(runtime_path, "w") as f:
            json.dump(runtime, f)
        result = None
        for plugin in conflist["plugins"]:
            result = run(conflist, plugin, "ADD", env, result, runtime)
        with open(state, "w") as f:
            json.dump(result, f)
        print(json.dumps(result))
    elif command == "del":
        try:
            with open(state) as f:
                result = json.load(f)
        except FileNotFoundError:
            result = None
        try:
            with open(runtime_path) as f:
                runtime = json.load(f)
        except FileNotFoundError:
            runtime = {}
        for plugin in reversed(conflist["plugins"]):
            run(conflist, plugin, "DEL", env, result, runtime)
        for path in (state, runtime_path):
            if os.path.exists(path):
                os.remove(path)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
