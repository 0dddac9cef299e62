#!/usr/bin/env python3
# What a lease renewal costs Redis, command by command: a redis-server on port 6391
# with N (default 100,000) session hashes and their index, then 512-session RENEW_MANY
# batches of the real script (read from store-redis/src/scripts.rs), of the one before
# it (a ZADD per session, array replies) and of variants without ZADD or HGET, interleaved
# three times; prints Redis's own time (INFO commandstats, EVALSHA usec) per renewed
# session. Needs redis-server and `pip install redis`. BENCHMARKS.md, issue 15.
import os, redis, subprocess, time, uuid, random, sys, re
PORT=6391
subprocess.run(['redis-server','--port',str(PORT),'--bind','127.0.0.1','--save','','--appendonly','no','--daemonize','yes','--logfile','/tmp/renew-script-cost-redis.log'])
time.sleep(0.5)
r=redis.Redis(port=PORT)
HERE=os.path.dirname(os.path.abspath(__file__))
def scripts(src):
    """The fenced and deadline preludes and RENEW_MANY's body from a scripts.rs text."""
    def macro(name):
        return re.search(r'macro_rules! '+name+r' \{.*?r#"(.*?)"#',src,re.S).group(1)
    fenced=macro('generation_prelude')+re.search(r'macro_rules! fenced_prelude.*?r#"(.*?)"#',src,re.S).group(1)
    body=re.search(r'const RENEW_MANY: &str = concat!\(.*?r#"(.*?)"#',src,re.S).group(1)
    return fenced, macro('deadline_prelude'), body
fenced,dl,body=scripts(open(os.path.join(HERE,'../../store-redis/src/scripts.rs')).read())
# The scripts before one ZADD per batch and plain 'ok' replies, from git.
old=subprocess.run(['git','-C',HERE,'show','f426831:crates/store-redis/src/scripts.rs'],capture_output=True,text=True,check=True).stdout
old_fenced,old_dl,old_body=scripts(old)
V={}
V['committed']=fenced+dl+body
V['before']=old_fenced+old_dl+old_body
V['before_no_zadd']=old_fenced+old_dl.replace("redis.call('ZADD', index, deadline, member)","")+old_body
V['committed_no_zadd']=fenced+dl.replace("redis.call('ZADD', index, unpack(scored))","")+body
V['before_no_hget']=old_fenced.replace("redis.call('HGET', key, 'generation')","'1'")+old_dl+old_body
for k,v in V.items():
    assert k in ('committed','before') or v not in (V['committed'],V['before']), k
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
        args=['600000']  # ten minutes: no session may expire during the run
        for c in batch: args+=['1',c]
        rep=r.evalsha(shas[name],len(keys),*keys,*args)
        if name in ('committed','before'):
            bad=[x for x in rep if x not in (b'ok',[b'ok'])]; assert not bad, (name, bad[:3])
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
