"""Queue depth and KV use, with hysteresis (as production-stack and llm-d scale through KEDA): a role
gets one more engine while requests queue on its engines (or wait in the router for their KV) or their
KV fills, and gives one back after `calm` intervals in a row with nothing queued and little running. Its
answers count serving engines: one still starting is the one it asked for."""

from microserve import Planner


class QueuePlanner(Planner):
    interval = 10.0
    cooldown = 30.0
    high = 1.0  # queued requests per engine that add an engine
    kv_high = 0.9  # KV use (0-1) that adds an engine
    low = 1.0  # running requests per engine under which the role is calm
    calm = 3  # calm intervals in a row before an engine goes

    def __init__(self):
        self.quiet = {}  # role -> calm intervals in a row

    async def plan(self, cluster, window):
        want = {}
        for role, w in window.roles.items():
            if not w.engines:
                continue
            queued = w.waiting + w.parked  # NOTE: parked: requests the router holds for want of the role's KV
            if queued / w.engines >= self.high or w.kv_usage >= self.kv_high:
                want[role], self.quiet[role] = w.engines + 1, 0
            elif w.engines > 1 and queued == 0 and w.running / w.engines < self.low:
                self.quiet[role] = self.quiet.get(role, 0) + 1
                if self.quiet[role] >= self.calm:
                    want[role], self.quiet[role] = w.engines - 1, 0
            else:
                self.quiet[role] = 0
        return want
