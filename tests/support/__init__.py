"""What the tests share and are not tests themselves: helpers, child processes, fault
proxies, the load generator, throwaway servers and the reliability report."""
