#!/usr/bin/env python3
# What a lease renewal costs Redis, command by command: a redis-server on port 6391
# with N (default 100,000) session hashes and their index, then 512-session RENEW_MANY
# batches of the real script (read from store-redis/src/scripts.rs) and of variants
# without ZADD, without HGET, with flat replies, and of the bare loop, interleaved
# three times; prints Redis's own time (INFO commandstats, EVALSHA usec) per renewed
# session. Needs redis-server and `pip install redis`. BENCHMARKS.md, issue 15.
import os, redis, subprocess, time, uuid, random, sys, re
PORT=6391
subprocess.run(['redis-server','--port',str(PORT),'--bind','127.0.0.1','--save','','--appendonly','no','--daemonize','yes','--logfile','/tmp/renew-script-cost-redis.log'])
time.sleep(0.5)
r=redis.Redis(port=PORT)
src=open(os.path.join(os.path.dirname(os.path.abspath(__file__)), '../../store-redis/src/scripts.rs')).read()
def macro(name):
    m=re.search(r'macro_rules! '+name+r' \{.*?r#"(.*?)"#',src,re.S); return m.group(1)
gen=macro('generation_prelude'); dl=macro('deadline_prelude')
fenced=gen+re.search(r'macro_rules! fenced_prelude.*?r#"(.*?)"#',src,re.S).group(1)
body=re.search(r'const RENEW_MANY: &str = concat!\(.*?r#"(.*?)"#',src,re.S).group(1)
V={}
V['current']=fenced+dl+body
V['noreply']=fenced+dl+body.replace("replies[i - 1] = {'ok'}","replies[i - 1] = 'ok'")
V['nozadd']=fenced+dl.replace("redis.call('ZADD', index, deadline, member)","")+body
V['nohget']=fenced.replace("redis.call('HGET', key, 'generation')","'1'")+dl+body
V['empty']=fenced+dl+"""
local replies = {}
for i = 2, #KEYS do replies[i-1] = 'ok' end
return replies
"""
N=int(sys.argv[1]) if len(sys.argv)>1 else 100000
ids=[str(uuid.uuid4()) for _ in range(N)]
now=int(time.time()*1000)
p=r.pipeline(transaction=False)
for i,c in enumerate(ids):
    k='numstream:{%s}'%c
    p.hset(k,mapping={'seed':b'x'*32,'count':'60','token_sha256':b'y'*32,'checksum':'123','generation':'1','attached':'1'})
    p.pexpireat(k,now+600000)
    p.zadd('numstream:sessions',{c:now+600000})
    if i%5000==0: p.execute()
p.execute()
shas={k:r.script_load(v) for k,v in V.items()}
def run(name,rounds):
    r.config_resetstat()
    t=time.time()
    for _ in range(rounds):
        batch=random.sample(ids,512)
        keys=['numstream:sessions']+['numstream:{%s}'%c for c in batch]
        args=['30000']
        for c in batch: args+=['1',c]
        rep=r.evalsha(shas[name],len(keys),*keys,*args)
    st=r.info('commandstats')
    ev=st['cmdstat_evalsha']
    return ev['usec']/(rounds*512), {k[8:]:v['usec_per_call'] for k,v in st.items() if k!='cmdstat_evalsha' and k!='cmdstat_config|resetstat'}
order=list(V)*3
random.shuffle(order)
res={k:[] for k in V}
for name in order:
    per,detail=run(name,200)
    res[name].append(per)
for k,v in res.items(): print(f"{k:10s} usec/key " + " ".join(f"{x:.2f}" for x in v))
r.shutdown(nosave=True)
