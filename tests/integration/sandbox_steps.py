"""The small steps the sandbox tests run in Python inside the sandbox (`python3 helper.py STEP ARGS`):
the documented commands print JSON, these pick out what the next command needs. Each test adds its own
steps as further `elif what == ...` branches."""

HELPER_STEPS = r'''
import base64, json, os, sys, time, urllib.parse
what = sys.argv[1]
if what == "tunnel-id":
    print(next(t["id"] for t in json.load(sys.stdin) if t["name"] == sys.argv[2]))
elif what == "account":
    pem = open(os.path.expanduser("~/.cloudflared/cert.pem")).read().splitlines()
    cert = json.loads(base64.b64decode("".join(pem[1:-1])))
    print(f"ACCT={cert['accountID']} KEY={cert['apiToken']}")
elif what == "config":
    rules = [{"hostname": sys.argv[2], "service": sys.argv[3]}, {"service": "http_status:404"}]
    print(json.dumps({"config": {"ingress": rules}}))
elif what == "version":
    print("PUT-VERSION", json.load(sys.stdin)["result"]["version"])
'''
