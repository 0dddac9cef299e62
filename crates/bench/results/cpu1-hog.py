# Takes about 30% of one CPU in 10 ms cycles (busy 3 ms, asleep 7 ms), like
# redis-server beside the load generator in issue 15's Redis column.
import time, sys
end = time.time() + float(sys.argv[1])
while time.time() < end:
    t = time.perf_counter()
    while time.perf_counter() - t < 0.003:
        pass
    time.sleep(0.007)
